// Placeholder until the bias_act kernels land: registers nothing yet.
#include "fastcnn/bindings.h"

namespace fastcnn::bindings {
void bind_cpu_bias_act(pybind11::module_&) {}
}  // namespace fastcnn::bindings
