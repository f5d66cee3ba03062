#!/usr/bin/perl
# make-slow-model.pl: writes a random-weight model whose inference takes
# seconds although its files are small, for the cancellation tests.
#
# Usage: make-slow-model.pl OUT_DIR QUADTREE_CSV [LAYERS]
#
# The cost is in attention: patch 4 on a 224 image gives 3137 tokens, so
# each layer computes two 3137 x 3137 x 64 products and a softmax over ten
# million scores, while its weights are a few hundred kilobytes.  LAYERS
# (default 40) scales the time; the cells are those of QUADTREE_CSV.
#
# Perl, not Python: test/run must work on a machine without torch or numpy.
# The weights are deterministic (a fixed linear congruential generator), and
# the layout is what the loader expects (docs/MODEL.md section 1): F32, [out, in]
# linear weights, an 8-byte little-endian header length, JSON, then data.
use strict;
use warnings;

my ($out, $quadtree, $layers) = @ARGV;
die "usage: $0 OUT_DIR QUADTREE_CSV [LAYERS]\n" unless defined $quadtree;
$layers //= 40;

my ($image, $patch, $hidden, $heads, $mlp) = (224, 4, 64, 1, 128);
my @mid = (32, 16);
my $tokens = ($image / $patch) ** 2 + 1;

open(my $qt, '<', $quadtree) or die "$quadtree: $!\n";
my @rows = grep { /\S/ } <$qt>;
close($qt);
my $cells = @rows - 1;			# minus the header line
die "$quadtree: no cells\n" if $cells < 1;

# uniform draws in [-1, 1) from a 31-bit LCG: deterministic everywhere
my $state = 20240601;
sub draw {
	$state = ($state * 1103515245 + 12345) % 2147483648;
	return $state / 1073741824.0 - 1.0;
}

# n values of standard deviation std (uniform: scale by sqrt 3), plus offset
sub values_of {
	my ($n, $std, $offset) = @_;
	return [map { $offset + draw() * $std * 1.7320508 } 1 .. $n];
}

my @tensors;					# [name, shape, values]
sub add {
	my ($name, $shape, $std, $offset) = @_;
	my $n = 1;
	$n *= $_ for @$shape;
	push @tensors, [$name, $shape, values_of($n, $std, $offset // 0)];
}

my $bb = 'backbone.clip.vision_model.';
add($bb . 'embeddings.class_embedding', [$hidden], $hidden**-0.5);
add($bb . 'embeddings.patch_embedding.weight', [$hidden, 3, $patch, $patch], (3 * $patch * $patch)**-0.5);
add($bb . 'embeddings.position_embedding.weight', [$tokens, $hidden], 0.02);
add($bb . 'pre_layrnorm.weight', [$hidden], 0.1, 1);
add($bb . 'pre_layrnorm.bias', [$hidden], 0.05);
for my $i (0 .. $layers - 1) {
	my $lp = $bb . "encoder.layers.$i.";
	for my $proj (qw(q_proj k_proj v_proj out_proj)) {
		add($lp . "self_attn.$proj.weight", [$hidden, $hidden], $hidden**-0.5);
		add($lp . "self_attn.$proj.bias", [$hidden], 0.02);
	}
	add($lp . 'layer_norm1.weight', [$hidden], 0.1, 1);
	add($lp . 'layer_norm1.bias', [$hidden], 0.05);
	add($lp . 'mlp.fc1.weight', [$mlp, $hidden], $hidden**-0.5);
	add($lp . 'mlp.fc1.bias', [$mlp], 0.02);
	add($lp . 'mlp.fc2.weight', [$hidden, $mlp], 0.5 * $mlp**-0.5);
	add($lp . 'mlp.fc2.bias', [$hidden], 0.02);
	add($lp . 'layer_norm2.weight', [$hidden], 0.1, 1);
	add($lp . 'layer_norm2.bias', [$hidden], 0.05);
}
add($bb . 'post_layernorm.weight', [$hidden], 0.1, 1);
add($bb . 'post_layernorm.bias', [$hidden], 0.05);
for my $branch (['classif', $cells], ['reg', 2 * $cells]) {
	my ($name, $final) = @$branch;
	my $mp = "mid.$name.";
	add($mp . '0.weight', [$hidden], 0.1, 1);
	add($mp . '0.bias', [$hidden], 0.05);
	add($mp . '1.weight', [$mid[0], $hidden], $hidden**-0.5);
	add($mp . '1.bias', [$mid[0]], 0.02);
	add($mp . '2.weight', [$mid[0]], 0.1, 1);
	add($mp . '2.bias', [$mid[0]], 0.05);
	add($mp . '4.weight', [$mid[1], $mid[0]], $mid[0]**-0.5);
	add($mp . '4.bias', [$mid[1]], 0.02);
	add($mp . '5.weight', [$mid[1]], 0.1, 1);
	add($mp . '5.bias', [$mid[1]], 0.05);
	add($mp . '7.weight', [$final, $mid[1]], 1.5 * $mid[1]**-0.5);
	add($mp . '7.bias', [$final], 0.1);
}

# the header: names in file order, offsets relative to the data start
my @entries;
my $offset = 0;
for my $t (@tensors) {
	my $nbytes = 4 * scalar(@{ $t->[2] });
	push @entries, sprintf('"%s":{"dtype":"F32","shape":[%s],"data_offsets":[%d,%d]}',
		$t->[0], join(',', @{ $t->[1] }), $offset, $offset + $nbytes);
	$offset += $nbytes;
}
my $header = '{"__metadata__":{"format":"pt"},' . join(',', @entries) . '}';
$header .= ' ' x ((8 - length($header) % 8) % 8);	# data 8-byte aligned

mkdir($out) unless -d $out;
open(my $fh, '>:raw', "$out/model.safetensors") or die "$out/model.safetensors: $!\n";
print $fh pack('Q<', length($header)), $header;
print $fh pack('f<*', @{ $_->[2] }) for @tensors;
close($fh) or die "$out/model.safetensors: $!\n";

open($fh, '>', "$out/config.json") or die "$out/config.json: $!\n";
print $fh <<"EOF";
{
  "hidden_size": $hidden,
  "num_hidden_layers": $layers,
  "num_attention_heads": $heads,
  "intermediate_size": $mlp,
  "patch_size": $patch,
  "image_size": $image,
  "hidden_act": "gelu",
  "layer_norm_eps": 1e-05
}
EOF
close($fh);

open($fh, '>', "$out/quadtree_10_1000.csv") or die "$out/quadtree_10_1000.csv: $!\n";
print $fh @rows;
close($fh);
