"""memtrain.optim"""
