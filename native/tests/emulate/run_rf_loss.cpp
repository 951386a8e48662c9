// native/tests/cuda_rf_loss.cpp under the CPU emulation, at vocabulary 1001 (the 128256 cases are
// the GPU's).
#include "cuda/cuda.h"
#define main test_main
#include "tests/cuda_rf_loss.cpp"
#undef main
int main() {
  for (rf::DType dtype : {rf::DType::f32, rf::DType::bf16})
    for (int K : {1, 3})
      for (rf::RfAggregation agg : {rf::RfAggregation::any, rf::RfAggregation::mean, rf::RfAggregation::single})
        run_case(1001, 80, K, agg, dtype, 8);
  run_case(1001, 80, 1, rf::RfAggregation::any, rf::DType::bf16, 0);  // the default chunk: one of each kind
  run_case(1001, 80, 3, rf::RfAggregation::mean, rf::DType::f32, 64, false, 600);  // dw_rf over 3 parts of rows
  for (rf::RfAggregation agg : {rf::RfAggregation::any, rf::RfAggregation::mean}) run_case(1001, 80, 3, agg, rf::DType::f32, 8, true);
  for (rf::RfAggregation agg : {rf::RfAggregation::any, rf::RfAggregation::mean, rf::RfAggregation::single})
    run_case(1001, 80, 3, agg, rf::DType::f32, 8, false, 41, -0.75f);  // the white-box attacks' negative weight
  for (rf::DType dtype : {rf::DType::f32, rf::DType::bf16})
    for (int K : {0, 1})
      for (bool with_dW : {false, true}) ce_case(dtype, K, with_dW);
  return rf::test::finish("cuda_rf_loss (emulated)");
}
