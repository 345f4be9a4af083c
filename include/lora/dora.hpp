#pragma once
// lora DoRA: magnitude-rescaled adapters (forward, backward, merge), and ModuleAdapter
// (LoRA or DoRA by the data, what a loaded PEFT module holds).

#include <lora/core.hpp>
#include <lora/dora/dora.hpp>
#include <lora/dora/module_adapter.hpp>
