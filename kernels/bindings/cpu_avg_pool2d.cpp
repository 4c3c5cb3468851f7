// Placeholder until the avg_pool2d kernels land: registers nothing yet.
#include "fastcnn/bindings.h"

namespace fastcnn::bindings {
void bind_cpu_avg_pool2d(pybind11::module_&) {}
}  // namespace fastcnn::bindings
