# Replays the fuzz corpora (tests/fuzz/corpus/<target>/) through each target's
# LLVMFuzzerTestOneInput with the normal compiler (no libFuzzer needed), as ctest tests
# fuzz_replay_<target>. include() it from tests/CMakeLists.txt.
set(_lora_fuzz_dir ${CMAKE_CURRENT_LIST_DIR})
foreach(t safetensors peft_config peft_adapter bnb_quant_state checkpoint_index pattern plan_config gguf)
  add_executable(fuzz_replay_${t} ${_lora_fuzz_dir}/fuzz_${t}.cpp ${_lora_fuzz_dir}/replay_main.cpp)
  target_link_libraries(fuzz_replay_${t} PRIVATE lora::lora lora_dev_flags)
  add_test(NAME fuzz_replay_${t} COMMAND fuzz_replay_${t} ${_lora_fuzz_dir}/corpus/${t})
  set_tests_properties(fuzz_replay_${t} PROPERTIES ENVIRONMENT "OMP_NUM_THREADS=1")
endforeach()
