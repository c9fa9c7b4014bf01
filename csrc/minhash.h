// MinHash signatures of word n-gram shingles (llama3hp.curate.minhash), the curation hot path.
//
// Plain C++17, no Python: bindings.cpp wraps it; the numpy fallback in llama3hp/curate/minhash.py
// computes the same values bit for bit (the tests compare them on random text):
//
// - Normalisation, byte by byte: ASCII letters lower-cased; a run of ASCII digits becomes one
//   '0'; bytes >= 0x80 (UTF-8 letters) are kept; every other byte separates words.
// - Word hash: zlib's CRC-32 of the normalised word bytes.
// - Shingle hash of words w[i..i+n): x = kFoldSeed; x = (x ^ w[j]) * kFoldPrime for each word in
//   order; then mix64(x) (xor-shift-multiply finaliser).
// - Signature value p: min over shingles of ((a[p] * x + b[p]) mod 2^64) >> 32 (multiply-shift
//   hashing; a[p] odd), as uint32. A document with fewer than n words has no shingle: its values
//   stay 0xFFFFFFFF and its shingle count is 0.
#pragma once

#include <cstdint>

namespace llama3hp {

constexpr uint64_t kFoldSeed = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kFoldPrime = 0x100000001B3ULL;

// Signatures of n_docs documents: text[offsets[d], offsets[d + 1]) is document d (UTF-8 bytes);
// out receives n_docs * n_perm values (row d is document d), n_shingles one count per document.
void minhash_signatures(const uint8_t* text, const int64_t* offsets, int64_t n_docs, int n_gram, const uint64_t* a,
                        const uint64_t* b, int n_perm, uint32_t* out, int64_t* n_shingles);

}  // namespace llama3hp
