"""memtrain.kernels"""
