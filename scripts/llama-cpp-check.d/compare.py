"""max |a - b| of two float32 logit dumps, and max |a| for scale. usage: compare.py a.bin b.bin"""
import struct, sys
a = open(sys.argv[1], 'rb').read(); b = open(sys.argv[2], 'rb').read()
assert len(a) == len(b), (len(a), len(b))
n = len(a) // 4
x = struct.unpack(f'<{n}f', a); y = struct.unpack(f'<{n}f', b)
print(f"{max(abs(p - q) for p, q in zip(x, y)):.3e} {max(abs(p) for p in x):.3e}")
