#pragma once
// lora training helpers: AdamW, schedules, clipping, losses, LoRA+.

#include <lora/core.hpp>
#include <lora/train/optim.hpp>
#include <lora/train/schedule.hpp>
#include <lora/train/loss.hpp>
#include <lora/train/loraplus.hpp>
