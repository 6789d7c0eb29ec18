// moe_gate_up_shared: for each (token, slot) pair, weight * silu(x . Wg) * (x . Wu) over the selected
// expert's gate and up rows, one pass over both, the shared expert as one more slot (body: moe_expert_core.h).
//// INCLUDE quant_common.h
#define GATED 1
#define MOE_SHARED 1
#define MOE_W2 w2
#define MOE_S2 scales2
#define MOE_B2 biases2
#define MOE_WT(i, shr) ((shr) ? 1.0f : float(wts[i]))
#define MOE_SW sw
#define MOE_SS sscales
#define MOE_SB sbiases
#define MOE_SW2 sw2
#define MOE_SS2 sscales2
#define MOE_SB2 sbiases2
//// BODY
//// INCLUDE moe_expert_core.h
