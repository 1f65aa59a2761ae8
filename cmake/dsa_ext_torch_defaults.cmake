# Defaults that let find_package(Torch) configure a CPU program on a machine without a GPU when
# torch is a CUDA build (its config then sets up CUDA too): name the target GPUs so it does not
# probe for a device, and point it at the toolkit. Values already set win. Used by this project's
# CMakeLists.txt and by the installed package's dsa_extConfig.cmake, before find_package(Torch).
if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(ENV{TORCH_CUDA_ARCH_LIST} "8.0;9.0")
endif()
if(NOT DEFINED CUDA_TOOLKIT_ROOT_DIR AND EXISTS /usr/local/cuda)
  set(CUDA_TOOLKIT_ROOT_DIR /usr/local/cuda)
endif()
