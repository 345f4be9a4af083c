#pragma once
// lora analysis: exact spectra from the factors, ranks, similarity, intruders, compression, combination, inspect, SVG plots (Eigen's dense decompositions; io for PEFT folders).

#include <lora/core.hpp>
#include <lora/analysis/lowrank_svd.hpp>
#include <lora/analysis/metrics.hpp>
#include <lora/analysis/similarity.hpp>
#include <lora/analysis/intruder.hpp>
#include <lora/analysis/compress.hpp>
#include <lora/analysis/combine.hpp>
#include <lora/analysis/inspect.hpp>
#include <lora/analysis/plot.hpp>
#include <lora/analysis/extract.hpp>
#include <lora/analysis/diff.hpp>
