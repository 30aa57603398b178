"""FP8 training numerics for the `emulate` backend: quantizers (`quant`), the three quantized GEMMs of a linear
layer (`gemm`) and per-tensor statistics (`stats`). Runs on any device; TE and torchao semantics, no FP8 hardware."""
