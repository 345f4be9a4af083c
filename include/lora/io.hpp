#pragma once
// lora I/O: safetensors, sharded checkpoints, PEFT adapter folders, PEFT-equal merges (POSIX, nlohmann-json).

#include <lora/core.hpp>
#include <lora/io/atomic.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/io/checkpoint.hpp>
#include <lora/io/peft.hpp>
#include <lora/io/merge.hpp>
