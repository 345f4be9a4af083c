#pragma once
// lora DoRA: magnitude-rescaled adapters (forward, backward, merge).

#include <lora/core.hpp>
#include <lora/dora/dora.hpp>
