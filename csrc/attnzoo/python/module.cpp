// attnzoo._C: importing it loads libattnzoo, whose static initialisers
// register the torch.ops.attnzoo.* operators, and binds the C++ models. The
// Python classes in attnzoo.models wrap these objects in an nn.Module facade
// that shares their tensors (docs/design.md section 6).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/python.h>

#include "attnzoo/attnzoo.h"
#include "attnzoo/models/models.h"

namespace py = pybind11;
using namespace attnzoo;

namespace {

// An opaque KV cache handle for GPT.forward_cached.
struct PyKVCache {
  nn::KVCache layers;
  int64_t length() const { return layers.empty() ? 0 : layers.front().length(); }
};

// py::init from config.json text.
template <typename M>
auto from_json() {
  return py::init([](const std::string& text) { return std::make_shared<M>(config_from_json(text)); });
}

py::list named_tensors_to_list(const io::NamedTensors& tensors) {
  py::list out;
  for (const auto& [name, t] : tensors) out.append(py::make_tuple(name, t));
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "attnzoo C++ extension";
  // Torch's errors without their C++ backtrace, as the exception types
  // Python code expects (ValueError, IndexError, ...).
  py::register_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::IndexError& e) {
      PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
  m.attr("__torch_ops_loaded__") = link_anchor();
  m.def("engine_isa", &ops::engine_isa, "Instruction set of the attention engine build chosen for this CPU");

  // Configs travel as JSON text; this parses, validates and returns the
  // complete canonical form (every field of the model kind).
  m.def("canonical_config", [](const std::string& text) { return config_to_json(config_from_json(text)); });

  m.def(
      "load_safetensors",
      [](const std::string& path) {
        auto file = io::load_safetensors(path);
        return py::make_tuple(named_tensors_to_list(file.tensors), file.metadata);
      },
      "The C++ safetensors reader: ([(name, tensor)], metadata)");
  m.def("parse_safetensors", [](py::bytes data) {
    std::string bytes = data;
    auto file = io::parse_safetensors(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
    return py::make_tuple(named_tensors_to_list(file.tensors), file.metadata);
  });
  m.def(
      "save_safetensors",
      [](const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
         const std::map<std::string, std::string>& metadata) {
        io::save_safetensors(path, io::NamedTensors(tensors.begin(), tensors.end()), metadata);
      },
      py::arg("path"), py::arg("tensors"), py::arg("metadata") = std::map<std::string, std::string>{});

  // The facade wraps a C++ child as a list when it is one (attnzoo.models.CppModule).
  m.def(
      "is_module_list",
      [](const std::shared_ptr<torch::nn::Module>& module) {
        return std::dynamic_pointer_cast<torch::nn::ModuleListImpl>(module) != nullptr;
      },
      "Whether a C++ module is a torch::nn::ModuleList");

  py::class_<PyKVCache>(m, "KVCache").def(py::init<>()).def_property_readonly("length", &PyKVCache::length);

  using models::ModelBase;
  py::class_<ModelBase, torch::nn::Module, std::shared_ptr<ModelBase>>(m, "ModelBase")
      .def("config_json", [](const ModelBase& self) { return config_to_json(self.config()); })
      .def("save_pretrained", &ModelBase::save_pretrained, py::arg("directory"))
      .def("state", [](const ModelBase& self) { return named_tensors_to_list(self.state()); })
      .def("load_state",
           [](ModelBase& self, const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
             self.load_state(io::NamedTensors(tensors.begin(), tensors.end()));
           })
      .def("record_attention", &ModelBase::record_attention, py::arg("on"))
      .def("take_attention_maps", &ModelBase::take_attention_maps);

  py::class_<models::GPTImpl, ModelBase, std::shared_ptr<models::GPTImpl>>(m, "GPT")
      .def(from_json<models::GPTImpl>())
      .def("forward", &models::GPTImpl::forward, py::arg("input_ids"), py::arg("attention_mask") = py::none())
      .def(
          "forward_cached",
          [](models::GPTImpl& self, const at::Tensor& ids, PyKVCache& cache) {
            return self.forward_cached(ids, cache.layers);
          },
          py::arg("input_ids"), py::arg("cache"))
      .def("supports_kv_cache", &models::GPTImpl::supports_kv_cache)
      .def(
          "generate",
          [](models::GPTImpl& self, const at::Tensor& ids, int64_t max_new_tokens, double temperature,
             int64_t top_k, double top_p, std::optional<int64_t> eos_token_id, bool use_cache,
             std::optional<uint64_t> seed) {
            models::GenerationOptions o;
            o.max_new_tokens = max_new_tokens;
            o.temperature = temperature;
            o.top_k = top_k;
            o.top_p = top_p;
            o.eos_token_id = eos_token_id;
            o.use_cache = use_cache;
            o.seed = seed;
            py::gil_scoped_release no_gil;
            return self.generate(ids, o);
          },
          py::arg("input_ids"), py::arg("max_new_tokens") = 32, py::arg("temperature") = 0.0,
          py::arg("top_k") = 0, py::arg("top_p") = 1.0, py::arg("eos_token_id") = py::none(),
          py::arg("use_cache") = true, py::arg("seed") = py::none());

  py::class_<models::BertImpl, ModelBase, std::shared_ptr<models::BertImpl>>(m, "Bert")
      .def(from_json<models::BertImpl>())
      .def("forward", &models::BertImpl::forward, py::arg("input_ids"),
           py::arg("attention_mask") = py::none(), py::arg("token_type_ids") = py::none(),
           py::arg("predict_mask") = py::none())
      .def("encode", &models::BertImpl::encode, py::arg("input_ids"), py::arg("attention_mask") = py::none(),
           py::arg("token_type_ids") = py::none())
      .def("classify", &models::BertImpl::classify, py::arg("input_ids"),
           py::arg("attention_mask") = py::none(), py::arg("token_type_ids") = py::none());

  py::class_<models::ViTImpl, ModelBase, std::shared_ptr<models::ViTImpl>>(m, "ViT")
      .def(from_json<models::ViTImpl>())
      .def("forward", &models::ViTImpl::forward, py::arg("pixel_values"))
      .def("encode", &models::ViTImpl::encode, py::arg("pixel_values"));

  py::class_<models::SpeechImpl, ModelBase, std::shared_ptr<models::SpeechImpl>>(m, "Speech")
      .def(from_json<models::SpeechImpl>())
      .def("forward", &models::SpeechImpl::forward, py::arg("waveforms"), py::arg("lengths") = py::none())
      .def("features", &models::SpeechImpl::features, py::arg("waveforms"), py::arg("lengths") = py::none())
      .def("greedy_decode", &models::SpeechImpl::greedy_decode, py::arg("log_probs"), py::arg("lengths"));

  m.def("from_pretrained", &attnzoo::from_pretrained, py::arg("directory"),
        "The C++ checkpoint loader: a model of the kind named in directory/config.json");
}
