"""How well do MR-patch reference parameters agree with the phantom's true microstructure?

Compares, on the patches of a demo patch store that carry true parameters, MR binarisations (one Otsu threshold per
knee, one per patch — the builder's default —, local adaptive) and with a
partial-volume bone fraction (BV/TV from grey levels, no binarisation). Pearson r with the truth per parameter.

    .venv/bin/python benchmarks/bench_mr_reference.py      # needs demo_out/ from `make demo`
"""
import numpy as np, pandas as pd, warnings
from scipy.stats import pearsonr, spearmanr
from skimage.filters import threshold_otsu, threshold_local
from ctsma.dataset.store import PatchStore
from ctsma.morphometry import measure_batch
st=PatchStore('demo_out/dataset/store'); t=st.table
ok=np.flatnonzero(np.isfinite(t[['true_BV/TV','true_Tb.Th']].to_numpy()).all(1))
mr=st.read('mr', ok)[:,0]; mm=st.read('mr_mask', ok)[:,0]>0
truth=t.iloc[ok]
sp=(0.25,)*3
def score(name, bone):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        r=measure_batch(bone, sp, masks=mm)
    out=[name]
    for p in ['BV/TV','Tb.Th','Tb.Sp','Tb.N']:
        x=np.asarray(r[p]); y=truth['true_'+p].to_numpy(); f=np.isfinite(x)&np.isfinite(y)
        out.append(f"{p} r={pearsonr(x[f],y[f])[0]:.2f} mean={np.nanmean(x):.2f}/{np.mean(y):.2f}")
    print(' | '.join(out))
# one Otsu threshold per knee over all ROI voxels of that knee's patches (the builder's `otsu-knee`)
subj = t['subject'].astype(str).to_numpy()
thr = {}
for s_ in np.unique(subj[ok]):
    rows = np.flatnonzero(subj == s_)
    allmr = st.read('mr', rows)[:, 0]
    allm = st.read('mr_mask', rows)[:, 0] > 0
    thr[s_] = threshold_otsu(allmr[allm])
score('otsu-knee', np.stack([p < thr[s_] for p, s_ in zip(mr, subj[ok])]))
score('otsu-patch', np.stack([p < threshold_otsu(p[m]) for p,m in zip(mr,mm)]))
score('local', np.stack([p < threshold_local(p, 15, offset=0) for p in mr]))
# partial-volume bone fraction: marrow level = 95th pct of ROI, bone level = 0
pv=[]
for p,m in zip(mr,mm):
    hi=np.percentile(p[m],95); frac=np.clip((hi-p[m])/hi,0,1); pv.append(frac.mean())
y=truth['true_BV/TV'].to_numpy(); print('pv BV/TV r=%.2f mean=%.2f/%.2f'%(pearsonr(pv,y)[0], np.mean(pv), y.mean()))
