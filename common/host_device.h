#ifndef SPARSEACCEL_COMMON_HOST_DEVICE_H_
#define SPARSEACCEL_COMMON_HOST_DEVICE_H_

// Marks functions of plain C++ headers that CUDA kernels call too: __host__ __device__ under
// nvcc, nothing elsewhere (the headers stay plain C++).
#ifdef __CUDACC__
#define SPARSEACCEL_HOST_DEVICE __host__ __device__
#else
#define SPARSEACCEL_HOST_DEVICE
#endif

#endif  // SPARSEACCEL_COMMON_HOST_DEVICE_H_
