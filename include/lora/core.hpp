#pragma once
// lora core: LowRankAdapter, scaling policies, PEFT's initialisers (Eigen/Core, fmt; PiSSA/OLoRA add Eigen's SVD).

#include <lora/error.hpp>
#include <lora/version.hpp>
#include <lora/core/types.hpp>
#include <lora/core/random.hpp>
#include <lora/core/scaling.hpp>
#include <lora/core/adapter.hpp>
#include <lora/core/init.hpp>
#include <lora/core/init_svd.hpp>
#include <lora/core/embedding.hpp>
#include <lora/core/lora_bias.hpp>
