#pragma once
// lora — low-rank adaptation math. The host-only umbrella: every module's umbrella below. A TU
// that needs one area includes that area's header alone (<lora/core.hpp> costs a fraction of this
// one; scripts/compile-cost prints each). <lora/cuda.hpp> adds the device specialisations.

#include <lora/core.hpp>
#include <lora/dora.hpp>
#include <lora/quant.hpp>
#include <lora/io.hpp>
#include <lora/analysis.hpp>
#include <lora/adalora.hpp>
#include <lora/train.hpp>
#include <lora/multi.hpp>
#include <lora/plan.hpp>
#include <lora/tp.hpp>
