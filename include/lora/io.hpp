#pragma once
// lora I/O: safetensors, sharded checkpoints, PEFT adapter folders, PEFT-equal merges, GGUF (llama.cpp)
// adapters, engine checks and normalisation (POSIX, nlohmann-json).

#include <lora/core.hpp>
#include <lora/io/atomic.hpp>
#include <lora/io/dtype.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/io/checkpoint.hpp>
#include <lora/io/peft.hpp>
#include <lora/io/merge.hpp>
#include <lora/io/gguf.hpp>
#include <lora/io/gguf_lora.hpp>
#include <lora/io/engines.hpp>
#include <lora/io/normalize.hpp>
#include <lora/io/file.hpp>
#include <lora/io/json.hpp>
#include <lora/io/pattern.hpp>
#include <lora/io/merge_quantized.hpp>
#include <lora/io/quantize.hpp>
