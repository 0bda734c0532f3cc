#!/usr/bin/env bash
# The runs behind each of the paper's results, as Hydra sweeps. Usage:
#
#   scripts/reproduce_paper.sh [--dry-run] FIGURE [extra overrides...]
#
# FIGURE: fig1 | fig2 | fig3 | gamma | placement | all (the paper's), or layernorm (fig2 with lnlstm). Extra overrides go to every run,
# e.g. data.root=../shared/data, hydra/launcher=joblib (local, parallel) or
# hydra/launcher=submitit_slurm hydra.launcher.partition=gpu (cluster; pip install -e '.[launchers]').
# --dry-run prints the commands instead of running them. Full-length runs take days on a
# CPU (200 epochs of MNIST, 50 of PTB): use a GPU (device=cuda) or a cluster launcher.
set -euo pipefail

dry_run=false
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=true; shift; fi
figure="${1:-}"
[[ -n "$figure" ]] && shift
extra=("$@")

run() {
    if $dry_run; then echo "$*"; else echo "+ $*" >&2; "$@"; fi
}

fig1() {  # gradient flow at initialisation against gamma (Fig. 1a, 1b)
    local root="data"
    for arg in "${extra[@]}"; do [[ "$arg" == data.root=* ]] && root="${arg#data.root=}"; done
    run bnrnn gradflow --data-root "$root" --out runs/paper/fig1
}
fig2() {  # sequential and permuted MNIST, LSTM vs BN-LSTM (Fig. 2, Table 1)
    run bnrnn train -m experiment=paper_seqmnist model=lstm,bnlstm "${extra[@]}"
    run bnrnn train -m experiment=paper_pmnist model=lstm,bnlstm "${extra[@]}"
}
fig3() {  # PTB, LSTM vs BN-LSTM (Fig. 3a, Table 1); then Fig. 3b with: bnrnn eval RUN_DIR --lengths paper
    run bnrnn train -m experiment=paper_ptb model=lstm,bnlstm "${extra[@]}"
}
gamma() {  # the gamma sweep of the appendix, on pMNIST and PTB
    run bnrnn train -m experiment=paper_pmnist model=bnlstm model.gamma_init=0.1,0.3,0.5,0.7,1.0 "${extra[@]}"
    run bnrnn train -m experiment=paper_ptb model=bnlstm model.gamma_init=0.1,0.3,0.5,0.7,1.0 "${extra[@]}"
}
layernorm() {  # beyond the paper: Fig. 2 with the layer-normalised LSTM beside (Ba et al.; gains start at 1,
               # not at the preset's 0.1, as LN's)
    fig2
    run bnrnn train -m experiment=paper_seqmnist model=lnlstm model.gamma_init=1.0 "${extra[@]}"
    run bnrnn train -m experiment=paper_pmnist model=lnlstm model.gamma_init=1.0 "${extra[@]}"
}
placement() {  # which terms to normalise: all 8 on/off combinations of x, h, c on pMNIST
    run bnrnn train -m experiment=paper_pmnist model=bnlstm model.normalize.x=true,false model.normalize.h=true,false \
        model.normalize.c=true,false "${extra[@]}"
}

case "$figure" in
    fig1|fig2|fig3|gamma|placement|layernorm) "$figure" ;;
    all) fig1; fig2; fig3; gamma; placement ;;
    *) echo "usage: $0 [--dry-run] fig1|fig2|fig3|gamma|placement|layernorm|all [overrides...]" >&2; exit 2 ;;
esac
if ! $dry_run; then
    echo "compare with: bnrnn report runs/multirun --out runs/paper/report" >&2
fi
