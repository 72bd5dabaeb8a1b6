// The C++ side of the zoo: the models' forward, training, checkpoints and
// cached generation from C++ (the readers' tests are in test_io.cpp).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/optim/adamw.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

#include "attnzoo/attnzoo.h"
#include "attnzoo/ops/cpu/cpu_support.h"
#include "attnzoo/ops/score_rules.h"
#include "test_support.h"

using namespace attnzoo_test;

TEST_CASE("every model builds, trains one step and round-trips its checkpoint from C++", "[models]") {
  torch::manual_seed(0);
  auto dir = temp_dir("models");
  const std::vector<std::string> configs = {
      gpt_json(R"({"kind": "rotary"})"),
      R"({"model_type": "bert", "vocab_size": 50, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_labels": 2,
          "attention": {"kind": "block_sparse", "block_size": 4}})",
      R"({"model_type": "vit", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "attention": {"kind": "shaw"}})",
      R"({"model_type": "speech", "vocab_size": 10, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "n_mels": 40,
          "conformer_conv": true, "attention": {"kind": "lsh", "bucket_size": 4}})",
      R"({"model_type": "speech_seq2seq", "vocab_size": 10, "hidden_size": 32, "num_layers": 1, "num_heads": 4,
          "n_mels": 40, "num_decoder_layers": 2, "decoder_attention": {"kind": "t5"},
          "cross_attention": {"kind": "linear"}})"};
  for (const auto& text : configs) {
    auto model = attnzoo::models::create_model(attnzoo::config_from_json(text));
    INFO(attnzoo::name(model->config().model_type));
    auto loss_of = [&](attnzoo::models::ModelBase& m) -> at::Tensor {
      if (auto* g = dynamic_cast<attnzoo::models::GPTImpl*>(&m))
        return g->forward(at::randint(0, 50, {2, 9})).logsumexp(-1).mean();
      if (auto* b = dynamic_cast<attnzoo::models::BertImpl*>(&m)) {
        auto ids = at::randint(0, 50, {2, 9});
        return b->classify(ids).pow(2).mean() + b->forward(ids).logsumexp(-1).mean();
      }
      if (auto* v = dynamic_cast<attnzoo::models::ViTImpl*>(&m))
        return v->forward(at::randn({2, 1, 8, 8})).pow(2).mean();
      if (auto* d = dynamic_cast<attnzoo::models::SpeechSeq2SeqImpl*>(&m)) {
        auto [logits, ctc, frames] =
            d->forward(at::randn({2, 3000}), std::nullopt, at::randint(0, 10, {2, 5}));
        return logits.logsumexp(-1).mean() + ctc.exp().pow(2).mean();
      }
      auto* s = dynamic_cast<attnzoo::models::SpeechImpl*>(&m);
      return std::get<0>(s->forward(at::randn({2, 3000}))).exp().pow(2).mean();
    };
    torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(1e-2));
    auto before = model->state();
    std::vector<at::Tensor> snapshot;
    for (auto& [name, t] : before) snapshot.push_back(t.detach().clone());
    auto loss = loss_of(*model);
    loss.backward();
    opt.step();
    size_t changed = 0;
    for (size_t i = 0; i < before.size(); ++i) changed += !at::equal(before[i].second, snapshot[i]);
    CHECK(changed == before.size());

    model->eval();
    const auto path = (dir / attnzoo::name(model->config().model_type)).string();
    model->save_pretrained(path);
    model->train();
    auto loaded = attnzoo::from_pretrained(path);
    // Loaded models are in eval mode (as HF's): no dropout until train().
    CHECK_FALSE(loaded->is_training());
    for (const auto& child : loaded->modules(/*include_self=*/false)) CHECK_FALSE(child->is_training());
    CHECK(attnzoo::config_to_json(loaded->config()) == attnzoo::config_to_json(model->config()));
    auto a = model->state(), b = loaded->state();
    REQUIRE(a.size() == b.size());
    for (size_t i = 0; i < a.size(); ++i) CHECK(at::equal(a[i].second, b[i].second));
  }
  // Strict loading names what does not fit.
  auto gpt = attnzoo::models::create_model(attnzoo::config_from_json(gpt_json()));
  auto state = gpt->state();
  state.erase(state.begin());
  state.emplace_back("stray.weight", at::zeros({1}));
  const auto message = error_of([&] { gpt->load_state(state); });
  CHECK_THAT(message, Catch::Contains("missing keys: layers.0.attn.q_proj.weight"));
  CHECK_THAT(message, Catch::Contains("unexpected keys: stray.weight"));
  CHECK_THAT(error_of([] { attnzoo::from_pretrained("/nonexistent/dir"); }), Catch::Contains("cannot open"));
  fs::remove_all(dir);
}

TEST_CASE("GPT: cached and uncached generation agree in C++", "[models]") {
  torch::manual_seed(1);
  for (const char* attention : {R"({"kind": "dense"})", R"({"kind": "alibi"})", R"({"kind": "shaw"})",
                                R"({"kind": "block_sparse", "layout": "local", "block_size": 4})"}) {
    INFO(attention);
    attnzoo::models::GPT gpt(attnzoo::config_from_json(gpt_json(attention)));
    gpt->eval();
    auto ids = at::randint(0, 50, {2, 15});
    torch::NoGradGuard no_grad;
    auto full = gpt->forward(ids);
    attnzoo::nn::KVCache cache;
    std::vector<at::Tensor> steps = {gpt->forward_cached(ids.narrow(1, 0, 6), cache)};
    for (int64_t t = 6; t < 15; ++t) steps.push_back(gpt->forward_cached(ids.narrow(1, t, 1), cache));
    CHECK((at::cat(steps, 1) - full).abs().max().item<double>() < 1e-4);
    attnzoo::models::GenerationOptions options;
    options.max_new_tokens = 10;
    auto with_cache = gpt->generate(ids.narrow(1, 0, 4), options);
    options.use_cache = false;
    CHECK(at::equal(with_cache, gpt->generate(ids.narrow(1, 0, 4), options)));
  }
}

TEST_CASE("speech_seq2seq: cached decoding and transcription agree with the full decoder in C++",
          "[models]") {
  torch::manual_seed(2);
  for (const char* attention : {R"({"kind": "rotary"})", R"({"kind": "linear"})"}) {
    INFO(attention);
    auto config = attnzoo::config_from_json(
        std::string(R"({"model_type": "speech_seq2seq", "vocab_size": 9, "hidden_size": 32, "num_layers": 1,
                        "num_heads": 4, "n_mels": 40, "dropout": 0.0, "decoder_attention": )") +
        attention + "}");
    attnzoo::models::SpeechSeq2Seq model(config);
    model->eval();
    torch::NoGradGuard no_grad;
    auto waves = at::randn({2, 7000}) * 0.3;
    auto lengths = at::tensor({7000, 5000}, at::kLong);
    auto [encoded, frames] = model->encode(waves, lengths);
    auto ids = at::randint(0, 9, {2, 6});
    auto full = model->decode(ids, encoded, frames);
    CHECK(at::allclose(std::get<0>(model->forward(waves, lengths, ids)), full, 1e-5, 1e-6));
    attnzoo::models::TranscribeOptions options;
    options.max_length = 8;
    auto greedy = model->transcribe(waves, lengths, options);
    options.use_cache = false;
    CHECK(model->transcribe(waves, lengths, options) == greedy);
    options.beam_size = 3;
    auto beam = model->transcribe(waves, lengths, options);
    options.use_cache = true;
    CHECK(model->transcribe(waves, lengths, options) == beam);
    if (!model->supports_kv_cache()) continue;
    attnzoo::nn::KVCache cache;
    std::vector<at::Tensor> steps = {model->decode(ids.narrow(1, 0, 2), encoded, frames, &cache)};
    for (int64_t t = 2; t < 6; ++t)
      steps.push_back(model->decode(ids.narrow(1, t, 1), encoded, frames, &cache));
    CHECK((at::cat(steps, 1) - full).abs().max().item<double>() < 1e-5);
    // The cross-attention keys come from the cache once it holds them.
    CHECK(cache.front().context_k.defined());
    CHECK_THAT(error_of([&] {
                 model->decode(ids.narrow(1, 0, 1).repeat({2, 1}), encoded.repeat({2, 1, 1}),
                               frames.repeat({2}), &cache);
               }),
               Catch::Contains("KV cache holds batch 2"));
    CHECK_THAT(error_of([&] { model->decode(ids, encoded.narrow(0, 0, 1), frames, &cache); }),
               Catch::Contains("encoded must have shape (2, frames, 32)"));
  }
}

TEST_CASE("replace_parameter: the forward reads the new tensor and its gradient reaches it", "[models]") {
  torch::manual_seed(2);
  attnzoo::models::GPT gpt(attnzoo::config_from_json(gpt_json(R"({"kind": "t5"})")));
  attnzoo::models::GPT twin(attnzoo::config_from_json(gpt_json(R"({"kind": "t5"})")));
  gpt->eval();
  twin->eval();
  auto ids = at::randint(0, 50, {2, 9});
  // every parameter (built-ins' weights and biases, the T5 table) replaced
  std::vector<std::pair<std::string, at::Tensor>> fresh;
  for (const auto& item : gpt->named_parameters(true)) {
    auto value = (item.value().detach() + 0.05 * at::randn_like(item.value())).requires_grad_();
    fresh.emplace_back(item.key(), value);
    auto dot = item.key().rfind('.');
    auto* owner = dot == std::string::npos ? gpt.ptr().get()
                                           : gpt->named_modules("", false)[item.key().substr(0, dot)].get();
    attnzoo::nn::replace_parameter(*owner, item.key().substr(dot + 1), value);
  }
  {
    torch::NoGradGuard no_grad;
    for (const auto& [name, value] : fresh) twin->named_parameters(true)[name].copy_(value);
  }
  auto out = gpt->forward(ids);
  CHECK(at::equal(out, twin->forward(ids)));
  out.logsumexp(-1).mean().backward();
  for (const auto& [name, value] : fresh) {
    INFO(name);
    CHECK(value.grad().defined());
    CHECK(gpt->named_parameters(true)[name].is_same(value));
  }
  auto* fc = gpt->named_modules("", false)["layers.0.mlp.fc_in"].get();
  CHECK_THROWS_WITH(attnzoo::nn::replace_parameter(*fc, "weight", at::randn({3, 3})),
                    Catch::Contains("has shape [128, 32]; the replacement has shape [3, 3]"));
  CHECK_THROWS_WITH(attnzoo::nn::replace_parameter(*fc, "scale", at::randn({3})),
                    Catch::Contains("has no parameter 'scale'"));
  CHECK_THROWS_WITH(attnzoo::nn::replace_parameter(*fc, "weight", at::Tensor()),
                    Catch::Contains("cannot be removed"));
}

TEST_CASE("transformer block with cross-attention reads the context and honours its padding", "[models]") {
  torch::manual_seed(3);
  auto config = attnzoo::config_from_json(gpt_json());
  attnzoo::nn::TransformerBlock block(config, config.attention[0], attnzoo::AttentionConfig{});
  block->eval();
  torch::NoGradGuard no_grad;
  auto x = at::randn({2, 5, 32}), context = at::randn({2, 7, 32});
  auto mask = at::ones({2, 7}, at::kBool);
  mask.narrow(1, 5, 2).fill_(false);
  attnzoo::nn::AttentionInputs inputs;
  inputs.causal = true;
  inputs.context = &context;
  inputs.context_padding_mask = mask;
  auto out = block->forward(x, inputs);
  // Changing padded context positions changes nothing; changing a real one does.
  auto other = context.clone();
  other.narrow(1, 5, 2).normal_();
  inputs.context = &other;
  CHECK(at::allclose(block->forward(x, inputs), out));
  other.narrow(1, 0, 1).normal_();
  CHECK(!at::allclose(block->forward(x, inputs), out));
  // The output of a query depends only on itself and earlier queries (causal self-attention).
  auto later = x.clone();
  later.narrow(1, 4, 1).normal_();
  inputs.context = &context;
  CHECK(at::allclose(block->forward(later, inputs).narrow(1, 0, 4), out.narrow(1, 0, 4), 1e-5, 1e-6));
  inputs.context = nullptr;
  CHECK_THAT(error_of([&] { block->forward(x, inputs); }), Catch::Contains("needs a context"));
  attnzoo::nn::MultiHeadAttention cross(config, attnzoo::AttentionConfig{}, /*cross=*/true);
  CHECK_THAT(error_of([&] { cross->forward(x); }), Catch::Contains("cross-attention layer needs a context"));
}

TEST_CASE("bad inputs to every model entry point give errors that name the argument", "[models]") {
  using namespace attnzoo::models;
  auto gpt = std::dynamic_pointer_cast<GPTImpl>(create_model(attnzoo::config_from_json(gpt_json())));
  auto bert = std::dynamic_pointer_cast<BertImpl>(create_model(attnzoo::config_from_json(
      R"({"model_type": "bert", "vocab_size": 50, "hidden_size": 32, "num_layers": 1, "num_heads": 4,
          "max_position_embeddings": 16})")));
  auto vit = std::dynamic_pointer_cast<ViTImpl>(create_model(attnzoo::config_from_json(
      R"({"model_type": "vit", "hidden_size": 32, "num_layers": 1, "num_heads": 4})")));
  auto speech = std::dynamic_pointer_cast<SpeechImpl>(create_model(attnzoo::config_from_json(
      R"({"model_type": "speech", "vocab_size": 10, "hidden_size": 32, "num_layers": 1, "num_heads": 4,
          "n_mels": 40})")));
  REQUIRE((gpt && bert && vit && speech));
  const auto ids = at::randint(0, 50, {2, 5});
  auto generate = [&](auto edit) {
    GenerationOptions o;
    o.max_new_tokens = 2;
    edit(o);
    gpt->generate(ids, o);
  };
  const std::vector<std::pair<std::string, std::function<void()>>> cases = {
      // GPT forward
      {"input_ids must have shape (batch, length)", [&] { gpt->forward(at::randint(0, 50, {5})); }},
      {"input_ids must have shape (batch, length)",
       [&] {
         gpt->forward(at::randint(0, 50, {1, 2, 3}));
       }},
      {"input_ids must have shape (batch, length)", [&] { gpt->forward(at::Tensor()); }},
      {"input_ids must hold at least one",
       [&] {
         gpt->forward(at::zeros({2, 0}, at::kLong));
       }},
      {"input_ids must hold at least one",
       [&] {
         gpt->forward(at::zeros({0, 4}, at::kLong));
       }},
      {"input_ids must hold integer ids",
       [&] {
         gpt->forward(at::rand({2, 5}));
       }},
      {"input_ids must hold integer ids",
       [&] {
         gpt->forward(at::ones({2, 5}, at::kBool));
       }},
      {"input_ids must lie in [0, 50)",
       [&] {
         gpt->forward(at::full({1, 3}, 50, at::kLong));
       }},
      {"input_ids must lie in [0, 50)",
       [&] {
         gpt->forward(at::full({1, 3}, -1, at::kLong));
       }},
      {"max_position_embeddings",
       [&] {
         gpt->forward(at::randint(0, 50, {1, 65}));
       }},
      {"attention_mask must have shape",
       [&] {
         gpt->forward(ids, at::ones({2, 4}, at::kBool));
       }},
      {"attention_mask must have shape", [&] { gpt->forward(ids, at::ones({5}, at::kBool)); }},
      {"attention_mask must be bool or integer",
       [&] {
         gpt->forward(ids, at::ones({2, 5}));
       }},
      // GPT generate
      {"max_new_tokens must be >= 0", [&] { generate([](GenerationOptions& o) { o.max_new_tokens = -1; }); }},
      {"temperature must be >= 0", [&] { generate([](GenerationOptions& o) { o.temperature = -0.5; }); }},
      {"temperature must be >= 0", [&] { generate([](GenerationOptions& o) { o.temperature = NAN; }); }},
      {"top_k must be >= 0", [&] { generate([](GenerationOptions& o) { o.top_k = -3; }); }},
      {"top_p must be in (0, 1]", [&] { generate([](GenerationOptions& o) { o.top_p = 0.0; }); }},
      {"top_p must be in (0, 1]", [&] { generate([](GenerationOptions& o) { o.top_p = 1.5; }); }},
      {"eos_token_id must be in [-1, 50)",
       [&] { generate([](GenerationOptions& o) { o.eos_token_id = 50; }); }},
      {"generate: prompt length", [&] { generate([](GenerationOptions& o) { o.max_new_tokens = 60; }); }},
      {"input_ids must lie in",
       [&] {
         gpt->generate(at::full({1, 2}, 99, at::kLong), {});
       }},
      {"the KV cache holds batch 2",
       [&] {
         attnzoo::nn::KVCache cache;
         gpt->forward_cached(ids, cache);
         gpt->forward_cached(ids.slice(0, 0, 1), cache);
       }},
      // Bert
      {"input_ids must lie in [0, 50)",
       [&] {
         bert->forward(at::full({1, 3}, 77, at::kLong));
       }},
      {"max_position_embeddings",
       [&] {
         bert->forward(at::randint(0, 50, {1, 17}));
       }},
      {"token_type_ids must have the shape of input_ids",
       [&] {
         bert->forward(ids, std::nullopt, at::zeros({2, 4}, at::kLong));
       }},
      {"token_type_ids must lie in [0, 2)",
       [&] {
         bert->forward(ids, std::nullopt, at::full({2, 5}, 2, at::kLong));
       }},
      {"attention_mask must have shape",
       [&] {
         bert->forward(ids, at::ones({1, 5}, at::kBool));
       }},
      {"classify needs a classification head", [&] { bert->classify(ids); }},
      // ViT
      {"pixel_values must have shape (batch, 1, 8, 8)",
       [&] {
         vit->forward(at::randn({2, 3, 8, 8}));
       }},
      {"pixel_values must have shape (batch, 1, 8, 8)",
       [&] {
         vit->forward(at::randn({2, 1, 9, 8}));
       }},
      {"pixel_values must have shape (batch, 1, 8, 8)",
       [&] {
         vit->forward(at::randn({1, 8, 8}));
       }},
      {"pixel_values must have shape (batch, 1, 8, 8)",
       [&] {
         vit->forward(at::randn({0, 1, 8, 8}));
       }},
      {"pixel_values must be floating",
       [&] {
         vit->forward(at::ones({2, 1, 8, 8}, at::kLong));
       }},
      // Speech
      {"waveforms must have shape (batch, samples)", [&] { speech->forward(at::randn({4000})); }},
      {"waveforms must have shape (batch, samples)",
       [&] {
         speech->forward(at::randn({0, 4000}));
       }},
      {"waveforms must be floating",
       [&] {
         speech->forward(at::ones({1, 4000}, at::kLong));
       }},
      {"at least n_fft = 400 samples",
       [&] {
         speech->forward(at::randn({1, 100}));
       }},
      {"too short for two stride-2 convolutions",
       [&] {
         speech->forward(at::randn({1, 600}));
       }},
      {"lengths must lie in [1, 4000]",
       [&] {
         speech->forward(at::randn({1, 4000}), at::full({1}, 5000, at::kLong));
       }},
      {"lengths must lie in [1, 4000]",
       [&] {
         speech->forward(at::randn({1, 4000}), at::zeros({1}, at::kLong));
       }},
      {"lengths must be (batch,) integers",
       [&] {
         speech->forward(at::randn({2, 4000}), at::full({1}, 10, at::kLong));
       }},
      {"lengths must be (batch,) integers",
       [&] {
         speech->forward(at::randn({1, 4000}), at::full({1}, 10.0));
       }},
      {"greedy_decode takes log_probs (B, T, vocab) and lengths (B,)",
       [&] {
         speech->greedy_decode(at::randn({4, 10}), at::ones({4}, at::kLong));
       }},
      {"greedy_decode takes log_probs (B, T, vocab) and lengths (B,)",
       [&] {
         speech->greedy_decode(at::randn({2, 4, 10}), at::ones({3}, at::kLong));
       }},
  };
  for (const auto& [expected, call] : cases) {
    INFO(expected);
    CHECK_THAT(error_of(call), Catch::Contains(expected));
  }
}

TEST_CASE("one model is safe to call from four threads at once", "[models][threads]") {
  using namespace attnzoo::models;
  torch::manual_seed(3);
  std::vector<std::shared_ptr<ModelBase>> zoo;
  for (const char* attention : {R"({"kind": "dense"})", R"({"kind": "rotary"})", R"({"kind": "t5"})",
                                R"({"kind": "block_sparse", "layout": "bigbird", "block_size": 4})"})
    zoo.push_back(create_model(attnzoo::config_from_json(gpt_json(attention))));
  zoo.push_back(create_model(attnzoo::config_from_json(
      R"({"model_type": "bert", "vocab_size": 50, "hidden_size": 32, "num_layers": 2, "num_heads": 4})")));
  zoo.push_back(create_model(attnzoo::config_from_json(
      R"({"model_type": "vit", "hidden_size": 32, "num_layers": 2, "num_heads": 4})")));
  zoo.push_back(create_model(attnzoo::config_from_json(
      R"({"model_type": "speech", "vocab_size": 10, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
          "n_mels": 40, "conformer_conv": true})")));
  for (auto& m : zoo) m->eval();
  const auto ids = at::randint(0, 50, {2, 24});
  const auto images = at::randn({3, 1, 8, 8});
  const auto waves = at::randn({2, 4000});
  // Each call returns one tensor; GPT calls also generate with their own KV cache.
  auto call = [&](size_t i) -> at::Tensor {
    torch::NoGradGuard no_grad;
    if (auto* g = dynamic_cast<GPTImpl*>(zoo[i].get())) {
      GenerationOptions o;
      o.max_new_tokens = 8;
      return at::cat({g->forward(ids).flatten(), g->generate(ids, o).to(at::kFloat).flatten()});
    }
    if (auto* b = dynamic_cast<BertImpl*>(zoo[i].get())) return b->forward(ids);
    if (auto* v = dynamic_cast<ViTImpl*>(zoo[i].get())) return v->forward(images);
    return std::get<0>(dynamic_cast<SpeechImpl*>(zoo[i].get())->forward(waves, at::tensor({4000, 2500})));
  };
  std::vector<at::Tensor> serial;
  for (size_t i = 0; i < zoo.size(); ++i) serial.push_back(call(i));
  const int kThreads = 4, kRounds = 3;
  std::vector<std::vector<at::Tensor>> results(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      // Every thread walks the whole zoo from a different starting model, so
      // each model is in use by several threads at the same time.
      for (int r = 0; r < kRounds; ++r)
        for (size_t j = 0; j < zoo.size(); ++j) results[t].push_back(call((j + t) % zoo.size()));
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) {
    REQUIRE(results[t].size() == kRounds * zoo.size());
    for (size_t n = 0; n < results[t].size(); ++n) {
      const size_t i = (n % zoo.size() + t) % zoo.size();
      INFO("thread " << t << " model " << i);
      // Rounding may differ when a thread's matrix products get fewer cores.
      CHECK((results[t][n] - serial[i]).abs().max().item<double>() < 1e-5);
    }
  }
}

TEST_CASE("nn::Dropout: drops a fraction p, scales by 1/(1-p), the backward uses the same pattern",
          "[models]") {
  torch::manual_seed(3);
  attnzoo::nn::Dropout dropout(0.3);
  const at::Tensor x = at::randn({64, 1000}).abs() + 0.5;  // no zeros of its own
  for (auto dtype : {at::kFloat, at::kBFloat16, at::kDouble, at::kHalf}) {
    const at::Tensor xd = x.to(dtype).clone().requires_grad_();
    const at::Tensor y = dropout(xd);
    const at::Tensor kept = y.ne(0);
    // 64000 draws: the dropped fraction within 5 standard deviations of p.
    const double dropped = 1.0 - kept.to(at::kDouble).mean().item<double>();
    const double sd = std::sqrt(0.3 * 0.7 / 64000);
    CHECK(std::abs(dropped - 0.3) < 5 * sd);
    CHECK(at::allclose(y.masked_select(kept).to(at::kDouble),
                       (xd.detach().masked_select(kept) / 0.7).to(dtype).to(at::kDouble), 1e-6, 0));
    const at::Tensor g = at::randn_like(xd);
    y.backward(g);
    CHECK(at::equal(xd.grad().ne(0), kept));
    CHECK(at::allclose(xd.grad().masked_select(kept).to(at::kDouble),
                       (g.masked_select(kept) / 0.7).to(dtype).to(at::kDouble), 1e-6, 0));
  }
  // With create_graph the gradient is differentiable in grad_out: d/dg of
  // sum(w * dx) is w times the pattern.
  {
    const at::Tensor xd = x.clone().requires_grad_();
    const at::Tensor y = dropout(xd);
    const at::Tensor g = at::randn_like(x).requires_grad_();
    const at::Tensor dx = torch::autograd::grad({y}, {xd}, {g}, std::nullopt, /*create_graph=*/true)[0];
    const at::Tensor w = at::randn_like(x);
    const at::Tensor dg = torch::autograd::grad({(dx * w).sum()}, {g})[0];
    CHECK(at::allclose(dg, w * y.ne(0).to(at::kFloat) / 0.7, 1e-6, 1e-6));
  }
  // A new pattern per call; the same one again after manual_seed; identity in eval mode.
  torch::manual_seed(4);
  const at::Tensor a = dropout(x);
  const at::Tensor b = dropout(x);
  torch::manual_seed(4);
  CHECK(at::equal(dropout(x), a));
  CHECK_FALSE(at::equal(a, b));
  dropout->eval();
  CHECK(dropout(x).is_same(x));
}

TEST_CASE("GELU (tanh) rows: every engine build against ATen's float64 GELU, forward and derivative",
          "[models]") {
  // The backward over a length no vector width divides; the forward in two
  // calls, the second a partial vector only; values out to +-12 (where the
  // exp saturates) and near 0.
  torch::manual_seed(11);
  const int64_t n = 4099;
  const at::Tensor x = at::cat(
      {at::randn({n - 6}, at::kDouble) * 3, at::tensor({-12.0, -7.5, -1e-4, 1e-4, 7.5, 12.0}, at::kDouble)});
  const at::Tensor dy = at::randn({n}, at::kDouble);
  const at::Tensor xg = x.clone().requires_grad_();
  const at::Tensor want = at::gelu(xg, "tanh");
  const at::Tensor want_dx = torch::autograd::grad({want}, {xg}, {dy})[0];
  std::vector<const attnzoo::cpu::EngineTable*> builds = {&attnzoo::cpu::engine_DEFAULT(),
                                                          &attnzoo::cpu::selected_engine()};
  const std::vector<at::ScalarType> types = {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf};
  const std::vector<double> tolerance = {2e-6, 1e-13, 1e-2, 2e-3};  // relative to max(1, |value|)
  for (const auto* build : builds) {
    for (size_t t = 0; t < types.size(); ++t) {
      INFO("engine " << build->isa << " dtype " << types[t]);
      const at::Tensor in = x.to(types[t]), g = dy.to(types[t]);
      // The reference at the rounded inputs, so only the rows' own error counts.
      const at::Tensor xr = in.to(at::kDouble).requires_grad_();
      const at::Tensor ref = at::gelu(xr, "tanh");
      const at::Tensor ref_dx = torch::autograd::grad({ref}, {xr}, {g.to(at::kDouble)})[0];
      at::Tensor out = at::empty_like(in), dx = at::empty_like(in);
      build->gelu_tanh_rows[t](false, in.const_data_ptr(), nullptr, out.data_ptr(), n - 3);
      build->gelu_tanh_rows[t](false,
                               static_cast<const char*>(in.const_data_ptr()) + (n - 3) * in.element_size(),
                               nullptr, static_cast<char*>(out.data_ptr()) + (n - 3) * in.element_size(), 3);
      build->gelu_tanh_rows[t](true, in.const_data_ptr(), g.const_data_ptr(), dx.data_ptr(), n);
      const auto rel = [](const at::Tensor& got, const at::Tensor& ref) {
        return ((got.to(at::kDouble) - ref) / ref.abs().clamp_min(1.0)).abs().max().item<double>();
      };
      CHECK(rel(out.narrow(0, 0, n - 3), ref.detach().narrow(0, 0, n - 3)) < tolerance[t]);
      CHECK(rel(out.narrow(0, n - 3, 3), ref.detach().narrow(0, n - 3, 3)) < tolerance[t]);
      CHECK(rel(dx, ref_dx) < tolerance[t]);
    }
  }
  // Through the models' activation (its autograd node), float64.
  const at::Tensor xm = x.clone().requires_grad_();
  const at::Tensor y = attnzoo::nn::activation(attnzoo::Activation::gelu_tanh, xm);
  CHECK(at::allclose(y, want.detach(), 1e-13, 1e-13));
  CHECK(at::allclose(torch::autograd::grad({y}, {xm}, {dy})[0], want_dx, 1e-12, 1e-12));
  // Second derivatives (create_graph): the node's gradient is differentiable.
  const at::Tensor y2 = attnzoo::nn::activation(attnzoo::Activation::gelu_tanh, xm);
  const at::Tensor dx_graph = torch::autograd::grad({y2}, {xm}, {dy}, std::nullopt, /*create_graph=*/true)[0];
  const at::Tensor want_graph =
      torch::autograd::grad({at::gelu(xg, "tanh")}, {xg}, {dy}, std::nullopt, true)[0];
  const at::Tensor w = at::randn({n}, at::kDouble);
  CHECK(at::allclose(torch::autograd::grad({(dx_graph * w).sum()}, {xm})[0],
                     torch::autograd::grad({(want_graph * w).sum()}, {xg})[0], 1e-12, 1e-12));
}

TEST_CASE("nn::Dropout's rows: every engine build keeps exactly the elements the rule keeps", "[models]") {
  // The vectorised rows (one per instruction set) against the scalar rule of
  // score_rules.h, from an offset and over a length no vector width divides.
  const uint64_t seed = 0x1234567ULL, first = 1000003;
  const double p = 0.37, scale = attnzoo::rules::dropout_keep_scale(p);
  const uint64_t threshold = attnzoo::rules::dropout_threshold(p);
  const int64_t n = 4099;
  const at::Tensor x = at::randn({n}, at::kDouble).abs() + 0.5;
  std::vector<const attnzoo::cpu::EngineTable*> builds = {&attnzoo::cpu::engine_DEFAULT(),
                                                          &attnzoo::cpu::selected_engine()};
  const std::vector<at::ScalarType> types = {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf};
  const std::vector<double> ulp = {0x1p-23, 0x1p-52, 0x1p-7, 0x1p-10};  // products may round differently
  for (const auto* build : builds) {
    for (size_t t = 0; t < types.size(); ++t) {
      INFO("engine " << build->isa << " dtype " << types[t]);
      const at::Tensor in = x.to(types[t]);
      at::Tensor out = at::empty_like(in);
      build->dropout_rows[t](in.const_data_ptr(), out.data_ptr(), n, first, seed, threshold, scale);
      std::vector<uint8_t> rule(n);
      for (int64_t i = 0; i < n; ++i) rule[i] = attnzoo::rules::dropout_keeps(seed, threshold, first + i);
      const at::Tensor keep = at::from_blob(rule.data(), {n}, at::kByte).to(at::kBool);
      CHECK(at::equal(out.ne(0), keep));
      CHECK(at::allclose(out.masked_select(keep).to(at::kDouble),
                         (in.to(at::kDouble).masked_select(keep) * scale).to(types[t]).to(at::kDouble),
                         ulp[t], 0));
    }
  }
}
