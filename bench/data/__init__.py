"""Data: the data set registry, the CIFAR file format, the synthetic stand-in, the noise
groups and the splits every stage reads (uint8 NHWC images, int64 labels)."""
