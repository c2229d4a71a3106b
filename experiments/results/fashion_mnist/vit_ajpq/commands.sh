# AJPQ's DDPG agent against random search on ViT-tiny (24 layers to choose), Fashion-MNIST, size 10 %
# of the fp32 export, 320 policies each, seeds 0-4 (experiments/RESULTS.md). Per seed: 1,000 fp32
# pre-training steps shared by both searches, then the search and 300 fine-tune steps of the best
# policy. Resumable; results in runs/fm_vit.
for S in 0 1 2 3 4; do
python -m experiments.compare --model vit_tiny_mnist --protocol 1000,300 --size 0.1 --seeds $S \
 --methods ajpq,ajpq_random --set all:data.name=fashion_mnist --root runs/fm_vit --jobs 1
done
python -m experiments.compare report runs/fm_vit
# best reward against evaluated policies, and the paired end points (curves.txt / curves.png)
python -m experiments.ajpq_curves runs/fm_vit ajpq_size0.1 ajpq_random_size0.1 --out curves.png > curves.txt
