import torch, sys
sys.path.insert(0, 'tests')
from safetensors.torch import load_file
from conftest import GOLDEN, golden_image
import tidal
print('tf32', torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
exp = load_file(str(GOLDEN / 'expected.safetensors'))
md = tidal.Moondream.from_pretrained(GOLDEN, device='cuda', dtype='float32')
def err(n):
    e = md.encode_image(golden_image(n)).embeds.cpu()
    w = exp['image_embeds.' + n]
    return float((e - w).abs().max() / w.abs().max())
for n in ('square378', 'wide', 'tall', 'big'):
    print(n, 'default', err(n))
with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
    for n in ('tall', 'big'):
        print(n, 'math sdpa', err(n))
md.close()
