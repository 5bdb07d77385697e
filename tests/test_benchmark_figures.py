"""The benchmark's arithmetic, without training: hardware FLOPs, the profiler's kernel classes, the aggregation
of per-process results, and the child processes' environment."""

import pytest
from transformers import Starcoder2Config

from starcoder2_train.benchmarking import aggregate, processes
from starcoder2_train.benchmarking.hardware_flops import (
    attention_forward_flops_per_layer,
    checkpointed_layers,
    hardware_flops_per_token,
    layer_matmul_params,
    loss_recomputes_logits,
    throughput_figures,
)
from starcoder2_train.benchmarking.profile import classify_kernel, split_device_time, union_length
from starcoder2_train.configs import ModelArguments, PretrainingArguments
from starcoder2_train.model.flops import model_flops_per_token
from starcoder2_train.model.presets import build_config

# 3B's shapes: hidden 3072, 24 heads of 128, 2 kv heads, intermediate 12288, 30 layers, vocabulary 49152.
CONFIG_3B = build_config(ModelArguments(model_config="starcoder2-3b"), 49152)


def test_layer_params_and_attention_term_rebuild_the_model_flops():
    # q and o: 3072 x 3072 each; k and v: 3072 x 256 each; c_fc and c_proj: 3072 x 12288 each.
    assert layer_matmul_params(CONFIG_3B) == 2 * 3072 * 3072 + 2 * 3072 * 256 + 2 * 3072 * 12288
    for convention in ("causal", "palm"):
        matmuls = 30 * layer_matmul_params(CONFIG_3B) + 49152 * 3072
        rebuilt = 6 * matmuls + 3 * 30 * attention_forward_flops_per_layer(CONFIG_3B, 4096, convention)
        assert rebuilt == pytest.approx(model_flops_per_token(CONFIG_3B, 4096, convention))
    # PaLM: k = s = 4096 keys for every query; 4·H·k per layer forward with H = 24 x 128.
    assert attention_forward_flops_per_layer(CONFIG_3B, 4096, "palm") == pytest.approx(4 * 3072 * 4096)


def test_hardware_flops_add_one_forward_per_checkpointed_layer_and_lm_head():
    config = Starcoder2Config(
        vocab_size=100,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=None,
    )
    # Per layer: q, o 8x8 = 64 each; k, v 8x4 = 32 each; c_fc, c_proj 8x16 = 128 each: 448 weights.
    assert layer_matmul_params(config) == 448
    model = model_flops_per_token(config, 6, "causal")
    # Causal, s = 6: k = (6+1)/2 = 3.5 keys per query; attention forward per layer 4 x 8 x 3.5 = 112.
    assert model == 6 * (3 * 448 + 100 * 8) + 12 * 3 * 8 * 3.5
    assert hardware_flops_per_token(config, 6) == model
    assert hardware_flops_per_token(config, 6, checkpointed_layers=2) == model + 2 * (2 * 448 + 112)
    assert hardware_flops_per_token(config, 6, checkpointed_layers=9) == model + 3 * (2 * 448 + 112)
    assert hardware_flops_per_token(config, 6, recompute_lm_head=True) == model + 2 * 100 * 8
    palm = hardware_flops_per_token(config, 6, checkpointed_layers=1, convention="palm")
    assert palm == model_flops_per_token(config, 6, "palm") + 2 * 448 + 4 * 8 * 6


def test_checkpointed_layers_and_loss_recomputation_follow_the_recipe_keys(tmp_path):
    def args(**keys):
        return PretrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **keys)

    assert checkpointed_layers(args(), 30) == 0
    assert checkpointed_layers(args(gradient_checkpointing=True), 30) == 30
    assert checkpointed_layers(args(gradient_checkpointing=True, gradient_checkpointing_layers=14), 30) == 14
    assert loss_recomputes_logits("chunked", 0, cuda=False) and loss_recomputes_logits("cut_cross_entropy", 0, True)
    assert not loss_recomputes_logits("liger", 4096, True) and not loss_recomputes_logits("transformers", 0, True)
    assert loss_recomputes_logits("auto", 4096, cuda=False) and not loss_recomputes_logits("auto", 0, cuda=False)


def test_throughput_figures_count_every_useful_token_at_the_training_context():
    figures = throughput_figures(20_000, CONFIG_3B, 4096, 989e12, checkpointed=14, recompute_lm_head=True)
    causal = model_flops_per_token(CONFIG_3B, 4096, "causal")
    assert figures["mfu_causal_at_seq_length"] == pytest.approx(20_000 * causal / 989e12)
    assert figures["mfu_palm"] > figures["mfu_causal_at_seq_length"]  # k = 4096 keys instead of ~2048
    assert figures["hardware_tflops"] > figures["model_tflops_causal"]
    assert "mfu_palm" not in throughput_figures(1.0, CONFIG_3B, 4096, None)  # no peak known: no MFU


# Kernel names as a CUDA trace shows them (cut after their first 100 characters), and CPU operator names.
KERNEL_NAMES = {
    "gemm": [
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off",
        "nvjet_tst_256x128_64x4_2x1_v_bz_coopA_NNT",
        "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(Params)",
        "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn",
        "triton_tem_fused_mm_3",
        "aten::addmm",
        "aten::mm",
    ],
    "attention": [
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false>, true>",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128>>",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<bf16>::Params)",
        "cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<...>>>",
        "triton_tem_fused_flex_attention_0",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
    ],
    "optimizer": [
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMath",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<TensorListMetadata<1>, LpNormFunctor",
        "aten::_foreach_mul_",
        "Optimizer.step#AdamW.step",
    ],
    "communication": [
        "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
        "ncclKernel_ReduceScatter_RING_LL_Sum_float",
        "c10d::allreduce_",
    ],
    "elementwise_norm": [
        "triton_per_fused__to_copy_add_native_layer_norm_native_layer_norm_backward_4",
        "triton_poi_fused_gelu_mul_7",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, LogSoftMaxForward",
        "void at::native::vectorized_elementwise_kernel<4, gelu_kernel_impl()::{lambda()#2}::{lambda(float)#1}>",
        "void at::native::elementwise_kernel<128, 2, BroadcastIndexing>(int, at::native::CUDAFunctor_mul)",
        "Memcpy DtoD (Device -> Device)",
        "aten::native_layer_norm",
        "aten::gelu_backward",
    ],
}


@pytest.mark.parametrize(("name", "kind"), [(name, kind) for kind, names in KERNEL_NAMES.items() for name in names])
def test_profiler_classifies_kernel_names(name, kind):
    assert classify_kernel(name) == kind


def test_device_time_split_counts_overlaps_once_and_the_rest_as_idle():
    assert union_length([(0, 2), (1, 3), (5, 6)]) == 4
    events = [("nvjet_tst_a", 0.0, 4.0), ("flash_fwd_kernel", 4.0, 2.0), ("ncclDevKernel_AllReduce", 3.0, 2.0)]
    split = split_device_time(events, wall_ms=10.0)
    assert split["busy_ms"] == 6.0 and split["idle_ms"] == 4.0  # the all-reduce overlaps the others
    assert split["ms"] == {
        "gemm": 4.0,
        "attention": 2.0,
        "elementwise_norm": 0.0,
        "optimizer": 0.0,
        "communication": 2.0,
    }
    assert split["share_of_wall"]["idle"] == pytest.approx(0.4)
    assert split["top_kernels"][0] == {"name": "nvjet_tst_a", "class": "gemm", "ms": 4.0, "calls": 1}


def run(tokens_per_second, peak, **more):
    return {"real_tokens_per_second_per_device": tokens_per_second, "peak_memory_gb": peak, "attention": "x", **more}


def test_aggregate_takes_the_median_and_range_over_processes():
    runs = [run(100.0, 5.0, mfu_palm=0.1), run(300.0, 7.0, mfu_palm=0.3), run(200.0, 6.0, mfu_palm=0.2)]
    runs.append({"error": "out of memory: CUDA"})
    result = aggregate.aggregate(runs)
    assert result["real_tokens_per_second_per_device"] == 200.0
    assert (result["real_tokens_per_second_per_device_min"], result["real_tokens_per_second_per_device_max"]) == (
        100.0,
        300.0,
    )
    assert result["mfu_palm"] == 0.2 and result["mfu_palm_max"] == 0.3
    assert result["peak_memory_gb"] == 7.0  # the largest peak, not the median
    assert result["attention"] == "x" and result["repeats"] == 4 and result["finished"] == 3
    failed = aggregate.aggregate([{"error": "a"}, {"error": "b"}])
    assert failed["error"] == "b" and failed["errors"] == ["a", "b"] and failed["finished"] == 0


def test_ratios_are_ours_over_each_baseline_and_the_best():
    results = {"ours": run(300.0, 1), "plain": run(100.0, 1), "flattening": run(200.0, 1)}
    ratios = aggregate.ratios(results)
    assert ratios == {"plain": 3.0, "flattening": 1.5, "best_baseline": "flattening", "vs_best_baseline": 1.5}
    assert aggregate.ratios({"ours": {"error": "x"}, "plain": run(1.0, 1)}) == {}
    difference = aggregate.loss_difference([10.0, 9.0, 8.0], [10.0, 9.5, 8.4, 7.0])
    assert difference["steps"] == 3 and difference["max_abs"] == pytest.approx(0.5)
    assert difference["last"] == pytest.approx(0.4) and difference["last_relative"] == pytest.approx(0.05)


def test_children_get_a_one_process_distributed_setup_for_deepspeed():
    env = processes.child_environment(deepspeed=True, cpu=True, base={"RANK": "3", "PATH": "/bin"})
    assert env["RANK"] == "3"  # what is set is kept
    assert env["WORLD_SIZE"] == "1" and env["LOCAL_RANK"] == "0" and env["MASTER_ADDR"] == "127.0.0.1"
    assert 0 < int(env["MASTER_PORT"]) < 65536
    assert env["DS_ACCELERATOR"] == "cpu" and env["CUDA_VISIBLE_DEVICES"] == ""
    plain = processes.child_environment(deepspeed=False, cpu=False, base={})
    assert "MASTER_PORT" not in plain and "DS_ACCELERATOR" not in plain
    words = ["--deepspeed", "zero1.json", "--use_cpu=true", "--languages", "Python", "C"]
    assert processes.uses_deepspeed(words) and processes.on_cpu(words)
    assert processes.recipe_keys(words)["languages"] == "C"
