#pragma once
// lora planner: trainable parameters, adapter size and memory before training.

#include <lora/plan/plan.hpp>
