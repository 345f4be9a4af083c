#pragma once
// lora tensor parallelism: adapters sharded like Megatron's column- and row-parallel layers,
// the collectives that complete them (a Communicator; LocalGroup runs ranks as threads), PEFT
// folders loaded as one rank's shard. The NCCL path is <lora/cuda/tp.cuh>. docs/tensor-parallel.md.

#include <lora/tp/shard.hpp>
#include <lora/tp/comm.hpp>
#include <lora/tp/layer.hpp>
#include <lora/tp/peft.hpp>
