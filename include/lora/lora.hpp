#pragma once
// lora — low-rank adaptation math. The host-only umbrella header; add
// <lora/cuda.hpp> for the device specialisations.

#include <lora/error.hpp>
#include <lora/version.hpp>
#include <lora/core/types.hpp>
#include <lora/core/random.hpp>
#include <lora/core/scaling.hpp>
#include <lora/core/adapter.hpp>
#include <lora/core/init.hpp>
#include <lora/quant/nf4.hpp>
#include <lora/quant/double_quant.hpp>
#include <lora/quant/nf4_tensor.hpp>
#include <lora/quant/qlora.hpp>
#include <lora/quant/bnb_format.hpp>
#include <lora/core/init_svd.hpp>
#include <lora/adalora/svd_adapter.hpp>
#include <lora/adalora/regularizer.hpp>
#include <lora/adalora/rank_allocator.hpp>
#include <lora/train/optim.hpp>
#include <lora/train/schedule.hpp>
#include <lora/train/loss.hpp>
#include <lora/train/loraplus.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/io/checkpoint.hpp>
#include <lora/io/peft.hpp>
#include <lora/io/merge.hpp>
#include <lora/dora/dora.hpp>
#include <lora/analysis/lowrank_svd.hpp>
#include <lora/analysis/metrics.hpp>
#include <lora/analysis/similarity.hpp>
#include <lora/analysis/intruder.hpp>
#include <lora/analysis/compress.hpp>
#include <lora/analysis/combine.hpp>
#include <lora/analysis/inspect.hpp>
#include <lora/analysis/plot.hpp>
