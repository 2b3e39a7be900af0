"""memtrain.offload"""
