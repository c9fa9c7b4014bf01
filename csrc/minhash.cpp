#include "minhash.h"

#include <algorithm>
#include <array>
#include <limits>
#include <stdexcept>
#include <vector>

namespace llama3hp {

namespace {

// zlib's CRC-32 (reflected polynomial 0xEDB88320), one table lookup per byte.
constexpr std::array<uint32_t, 256> make_crc_table() {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
        uint32_t c = i;
        for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        t[i] = c;
    }
    return t;
}
constexpr std::array<uint32_t, 256> kCrc = make_crc_table();

inline uint64_t mix64(uint64_t x) {
    x ^= x >> 32;
    x *= 0xD6E8FEB86659FD93ULL;
    x ^= x >> 32;
    return x;
}

// CRC-32 of each normalised word of text[begin, end), appended to words.
void word_hashes(const uint8_t* p, const uint8_t* end, std::vector<uint32_t>& words) {
    uint32_t crc = 0;
    bool in_word = false;
    bool in_digits = false;
    for (; p < end; ++p) {
        uint8_t c = *p;
        const bool digit = c >= '0' && c <= '9';
        if (c >= 'A' && c <= 'Z') c = static_cast<uint8_t>(c + 32);
        const bool word = digit || (c >= 'a' && c <= 'z') || c >= 0x80;
        if (!word) {
            if (in_word) words.push_back(~crc);
            in_word = in_digits = false;
            continue;
        }
        if (!in_word) {
            crc = 0xFFFFFFFFu;
            in_word = true;
        }
        if (digit) {
            if (in_digits) continue;  // a digit run folds to one '0'
            in_digits = true;
            c = '0';
        } else {
            in_digits = false;
        }
        crc = kCrc[(crc ^ c) & 0xFFu] ^ (crc >> 8);
    }
    if (in_word) words.push_back(~crc);
}

}  // namespace

void minhash_signatures(const uint8_t* text, const int64_t* offsets, int64_t n_docs, int n_gram, const uint64_t* a,
                        const uint64_t* b, int n_perm, uint32_t* out, int64_t* n_shingles) {
    if (n_gram < 1 || n_perm < 1) {
        throw std::invalid_argument("minhash_signatures: n_gram and n_perm must be >= 1");
    }
    std::vector<uint32_t> words;
    std::vector<uint64_t> mins(static_cast<size_t>(n_perm));
    for (int64_t d = 0; d < n_docs; ++d) {
        words.clear();
        word_hashes(text + offsets[d], text + offsets[d + 1], words);
        const int64_t n_sh = static_cast<int64_t>(words.size()) - n_gram + 1;
        std::fill(mins.begin(), mins.end(), std::numeric_limits<uint64_t>::max());
        for (int64_t i = 0; i < n_sh; ++i) {
            uint64_t x = kFoldSeed;
            for (int j = 0; j < n_gram; ++j) x = (x ^ words[static_cast<size_t>(i + j)]) * kFoldPrime;
            x = mix64(x);
            // The inner loop over permutations is independent per lane, so the compiler keeps
            // it in registers; the high 32 bits are compared as the 64-bit products' tops.
            for (int p = 0; p < n_perm; ++p) {
                const uint64_t v = (a[p] * x + b[p]) >> 32;
                mins[static_cast<size_t>(p)] = v < mins[static_cast<size_t>(p)] ? v : mins[static_cast<size_t>(p)];
            }
        }
        uint32_t* row = out + d * n_perm;
        for (int p = 0; p < n_perm; ++p) {
            row[p] = n_sh > 0 ? static_cast<uint32_t>(mins[static_cast<size_t>(p)]) : 0xFFFFFFFFu;
        }
        n_shingles[d] = n_sh > 0 ? n_sh : 0;
    }
}

}  // namespace llama3hp
