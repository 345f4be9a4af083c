#pragma once
// lora AdaLoRA: SVD-form adapters, the orthogonal regulariser, PEFT's rank allocator.

#include <lora/core.hpp>
#include <lora/adalora/svd_adapter.hpp>
#include <lora/adalora/regularizer.hpp>
#include <lora/adalora/rank_allocator.hpp>
