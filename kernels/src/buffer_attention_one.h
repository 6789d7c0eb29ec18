// buffer_attention_one: buffer_attention.h with one partition over the whole context, writing
// the normalised output (B, NH, D) in T directly: no reduce launch.
#define ONE 1
//// INCLUDE buffer_attention.h
