#include "decode_service/request_metrics.h"

namespace sparseaccel {

DecodeRequestMetrics::DecodeRequestMetrics(prometheus::Registry* registry)
    : requests(prometheus::BuildCounter()
                   .Name("sparseaccel_generate_requests_total")
                   .Help("Generate requests by outcome (gRPC code) and finish reason.")
                   .Register(*registry)),
      ttft(prometheus::BuildHistogram()
               .Name("sparseaccel_time_to_first_token_seconds")
               .Help("Request arrival to first token sent, by prompt length bucket.")
               .Register(*registry)),
      itl(prometheus::BuildHistogram()
              .Name("sparseaccel_inter_token_latency_seconds")
              .Help("Time between consecutive tokens sent, by context length bucket.")
              .Register(*registry)),
      e2e(prometheus::BuildHistogram()
              .Name("sparseaccel_request_duration_seconds")
              .Help("End-to-end Generate latency, by prompt length bucket.")
              .Register(*registry)),
      prefill_seconds(prometheus::BuildHistogram()
                          .Name("sparseaccel_remote_prefill_duration_seconds")
                          .Help("Prefill compute time reported by the prefill service.")
                          .Register(*registry)),
      kv_seconds(prometheus::BuildHistogram()
                     .Name("sparseaccel_kv_transfer_duration_seconds")
                     .Help("First to last KV byte received from the prefill service.")
                     .Register(*registry)),
      kv_bytes(prometheus::BuildHistogram()
                   .Name("sparseaccel_kv_transfer_bytes")
                   .Help("KV cache bytes received per request.")
                   .Register(*registry)),
      pool_blocks(prometheus::BuildGauge()
                      .Name("sparseaccel_kv_pool_blocks")
                      .Help("Paged KV pool blocks by state (used, free).")
                      .Register(*registry)),
      queue_depth(prometheus::BuildGauge()
                      .Name("sparseaccel_decode_queue_depth")
                      .Help("Requests waiting for KV cache space.")
                      .Register(*registry)
                      .Add({})),
      running(prometheus::BuildGauge()
                  .Name("sparseaccel_decode_running_sequences")
                  .Help("Sequences in the continuous batch.")
                  .Register(*registry)
                  .Add({})),
      pool_bytes(prometheus::BuildGauge()
                     .Name("sparseaccel_kv_pool_bytes")
                     .Help("Paged KV pool bytes by state (used, free).")
                     .Register(*registry)),
      host_memory(prometheus::BuildGauge()
                      .Name("sparseaccel_host_memory_bytes")
                      .Help("Resident host memory of the process.")
                      .Register(*registry)
                      .Add({{"service", "decode"}})),
      gpu_memory(prometheus::BuildGauge()
                     .Name("sparseaccel_gpu_memory_used_bytes")
                     .Help("GPU memory in use on the service's device (all processes).")
                     .Register(*registry)
                     .Add({{"service", "decode"}})) {}

}  // namespace sparseaccel
