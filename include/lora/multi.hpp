#pragma once
// lora many adapters: mixed-adapter batches, hot-swap, PEFT folders by name.

#include <lora/core.hpp>
#include <lora/multi/adapter_set.hpp>
#include <lora/multi/peft_collection.hpp>
