#pragma once
// lora NF4/QLoRA: bitsandbytes-exact NF4, double quantisation, the QLoRA layer, transformers' bnb-4bit layout (adds nlohmann-json and the safetensors reader).

#include <lora/core.hpp>
#include <lora/quant/nf4.hpp>
#include <lora/quant/double_quant.hpp>
#include <lora/quant/nf4_tensor.hpp>
#include <lora/quant/qlora.hpp>
#include <lora/quant/bnb_format.hpp>
#include <lora/quant/nf4_cpu.hpp>
#include <lora/quant/loftq.hpp>
