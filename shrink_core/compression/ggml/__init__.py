"""llama.cpp's weight types (GGML block formats) as engine settings: exact block bytes, quantize and dequantize."""
