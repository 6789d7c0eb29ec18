// qk_rope_cache: qk_rope (qk_rope.h) writing the token's k and v rows into the KV cache
// buffers in place. Inputs as qk_rope plus kcache / vcache (B, KV, capacity, D) and cap (int32
// [capacity]); output q only: row pos[0] of every (sequence, kv head) is the new entry.
#define QK_CACHE 1
//// INCLUDE qk_rope.h
