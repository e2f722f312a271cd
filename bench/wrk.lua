-- wrk script for the manifest GET load: adds the Basic credentials and the Accept header
-- from the environment, and prints one machine-readable summary line for bench/driver.py.
--
--   BENCH_AUTHORIZATION="Basic dXNlcjpwYXNz" BENCH_ACCEPT="application/vnd.oci..." \
--     wrk -t2 -c32 -d10s --timeout 30s -s bench/wrk.lua http://127.0.0.1:PORT/v2/NAME/manifests/TAG

local authorization = os.getenv("BENCH_AUTHORIZATION")
local accept = os.getenv("BENCH_ACCEPT")

if authorization ~= nil and authorization ~= "" then
  wrk.headers["Authorization"] = authorization
end
if accept ~= nil and accept ~= "" then
  wrk.headers["Accept"] = accept
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    "BENCH_JSON {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d," ..
    "\"errors\":{\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d}," ..
    "\"latency_us\":{\"min\":%d,\"mean\":%.1f,\"max\":%d,\"p50\":%d,\"p90\":%d,\"p99\":%d,\"p999\":%d}}\n",
    summary.requests, summary.duration, summary.bytes,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout,
    latency.min, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
