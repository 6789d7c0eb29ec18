// mla_q_cache: mla_q (mla_q.h) writing the cache row in place. Inputs as mla_q plus cache, the
// latent cache buffer (1, 1, capacity, YH); output y only: row pos of cache is the row.
#define MLA_Q_CACHE 1
//// INCLUDE mla_q.h
