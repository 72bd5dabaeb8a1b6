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

// One layer call handed to Python (ModelBase::LayerRunner): the block's
// attention inputs, owning the cross-attention context so that the call stays
// valid when activation checkpointing replays it in the backward pass. The
// cache and attention-map pointers are only used inside the forward call.
struct LayerCall {
  explicit LayerCall(const nn::AttentionInputs& in) : inputs(in) {
    if (in.context) {
      context = *in.context;
      inputs.context = &context;
    }
  }
  LayerCall(const LayerCall&) = delete;
  LayerCall& operator=(const LayerCall&) = delete;
  nn::AttentionInputs inputs;
  at::Tensor context;
};

// A Python callable kept by C++ code that may run without the GIL (generate):
// calls and the final release take the GIL.
std::shared_ptr<py::object> hold_python(py::object fn) {
  return std::shared_ptr<py::object>(new py::object(std::move(fn)), [](py::object* o) {
    if (!Py_IsInitialized()) return;  // at interpreter exit: nothing left to release into
    py::gil_scoped_acquire gil;
    delete o;
  });
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
  m.def("cpu_bf16_engine", &ops::cpu_bf16_engine,
        "Whether bfloat16 inputs are computed in bfloat16 (with float accumulation) on this CPU");

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

  m.def(
      "is_transformer_block",
      [](const std::shared_ptr<torch::nn::Module>& module) {
        return std::dynamic_pointer_cast<nn::TransformerBlockImpl>(module) != nullptr;
      },
      "Whether a C++ module is an attnzoo transformer block");
  m.def(
      "replace_parameter",
      [](const std::shared_ptr<torch::nn::Module>& module, const std::string& name,
         const std::optional<at::Tensor>& value) {
        nn::replace_parameter(*module, name, value.value_or(at::Tensor()));
      },
      py::arg("module"), py::arg("name"), py::arg("value"),
      "Makes value the parameter `name` of a C++ module, in its parameter list and in the member its "
      "forward reads");
  py::class_<LayerCall, std::shared_ptr<LayerCall>>(m, "LayerCall",
                                                    "One transformer block call's attention inputs (opaque)");
  m.def(
      "run_block",
      [](const std::shared_ptr<torch::nn::Module>& module, const at::Tensor& h, const LayerCall& call) {
        auto block = std::dynamic_pointer_cast<nn::TransformerBlockImpl>(module);
        TORCH_CHECK_TYPE(block, "run_block: not a transformer block: ", module->name());
        return block->forward(h, call.inputs);
      },
      py::arg("block"), py::arg("hidden_states"), py::arg("call"));

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
      .def("take_attention_maps", &ModelBase::take_attention_maps)
      .def("take_cross_attention_maps", &ModelBase::take_cross_attention_maps)
      .def(
          "set_layer_runner",
          [](ModelBase& self, py::object runner) {
            if (runner.is_none()) return self.set_layer_runner(nullptr);
            auto fn = hold_python(std::move(runner));
            self.set_layer_runner([fn](size_t layer, const at::Tensor& h, const nn::AttentionInputs& inputs) {
              py::gil_scoped_acquire gil;
              return (*fn)(layer, h, std::make_shared<LayerCall>(inputs)).cast<at::Tensor>();
            });
          },
          py::arg("runner"),
          "runner(layer, hidden_states, call) -> hidden_states runs each block (None: run them directly)");

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
      .def("greedy_decode", &models::SpeechImpl::greedy_decode, py::arg("log_probs"), py::arg("lengths"))
      .def("encode", &models::SpeechImpl::encode, py::arg("waveforms"), py::arg("lengths") = py::none());

  py::class_<models::SpeechSeq2SeqImpl, models::SpeechImpl, std::shared_ptr<models::SpeechSeq2SeqImpl>>(
      m, "SpeechSeq2Seq")
      .def(from_json<models::SpeechSeq2SeqImpl>())
      .def("forward", &models::SpeechSeq2SeqImpl::forward, py::arg("waveforms"), py::arg("lengths"),
           py::arg("decoder_input_ids"))
      .def(
          "decode",
          [](models::SpeechSeq2SeqImpl& self, const at::Tensor& ids, const at::Tensor& encoded,
             const at::Tensor& frames, PyKVCache* cache) {
            return self.decode(ids, encoded, frames, cache ? &cache->layers : nullptr);
          },
          py::arg("decoder_input_ids"), py::arg("encoded"), py::arg("frames"), py::arg("cache") = py::none())
      .def("supports_kv_cache", &models::SpeechSeq2SeqImpl::supports_kv_cache)
      .def(
          "ctc",
          [](models::SpeechSeq2SeqImpl& self, const at::Tensor& waveforms,
             const std::optional<at::Tensor>& lengths) {
            return self.SpeechImpl::forward(waveforms, lengths);
          },
          py::arg("waveforms"), py::arg("lengths") = py::none())
      .def(
          "transcribe",
          [](models::SpeechSeq2SeqImpl& self, const at::Tensor& waveforms,
             const std::optional<at::Tensor>& lengths, int64_t beam_size, int64_t max_length,
             double length_penalty, bool use_cache, double ctc_weight) {
            models::TranscribeOptions o;
            o.ctc_weight = ctc_weight;
            o.beam_size = beam_size;
            o.max_length = max_length;
            o.length_penalty = length_penalty;
            o.use_cache = use_cache;
            py::gil_scoped_release no_gil;
            return self.transcribe(waveforms, lengths, o);
          },
          py::arg("waveforms"), py::arg("lengths") = py::none(), py::arg("beam_size") = 1,
          py::arg("max_length") = 0, py::arg("length_penalty") = 1.0, py::arg("use_cache") = true,
          py::arg("ctc_weight") = 0.0);

  m.def("from_pretrained", &attnzoo::from_pretrained, py::arg("directory"),
        "The C++ checkpoint loader: a model of the kind named in directory/config.json");
}
