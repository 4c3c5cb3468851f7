// Placeholder until the max_pool2d kernels land: registers nothing yet.
#include "fastcnn/bindings.h"

namespace fastcnn::bindings {
void bind_cuda_max_pool2d(pybind11::module_&) {}
}  // namespace fastcnn::bindings
