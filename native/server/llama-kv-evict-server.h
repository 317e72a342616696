// The seam between llama.cpp's own server (tools/server) and pyllmkv's eviction: the only calls the server patch adds.
// LLAMA_KV_EVICT in the environment ("budget=1024 policy=criticalkv ...", fields of llama_kv_evict_params) turns
// eviction on, each slot within its own cells; unset, every call leaves the server as stock llama-server.
#pragma once

#include "common.h"
#include "llama.h"

// Before the context is made: reads LLAMA_KV_EVICT and sizes the cache for it, a stream per slot (no unified cache) of
// the cells a slot keeps + n_batch (or -c / slots if larger), with no context shift and no host-memory prompt cache
// (it restores cells without the hook's state). Returns false, the reason logged, for settings the hook refuses.
bool llama_kv_evict_server_params(common_params & params);

// After the context is made: enables eviction on it. Returns false, the reason logged, if the hook refuses the model.
bool llama_kv_evict_server_enable(llama_context * ctx);

// The context of a slot in tokens: with eviction, the model's training context (positions go on, cells stay
// bounded); else n_ctx_slot as the server computed it.
int32_t llama_kv_evict_server_n_ctx_slot(const llama_context * ctx, const llama_model * model, int32_t n_ctx_slot);

// A slot whose cached tokens and the next prompt share n_past tokens resumes at n_past, or earlier if the cell before
// it was evicted: llama.cpp continues a sequence only right after its highest position. Removes the cells from there.
int32_t llama_kv_evict_server_resume_at(llama_context * ctx, llama_seq_id seq_id, int32_t n_past);

// Before a decode: evicts each sequence that the batch would take past its cells + n_batch, the others stay as they
// are. Throws std::runtime_error with the hook's reason.
void llama_kv_evict_server_make_room(llama_context * ctx, const common_batch & batch);
