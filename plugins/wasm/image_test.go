package wasm

import (
	"bytes"
	"context"
	"encoding/json"
	"path/filepath"
	"testing"

	ctrs "github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/metadata"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/typeurl/v2"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	bolt "go.etcd.io/bbolt"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/kuasar-io/containerd-kuasar/plugins/task"
)

func TestNormalizeImageName(t *testing.T) {
	const d = "sha256:4e1b2a2a6f8c0c2d0c1f5f1c8b8e2c6a6d3e0f9a8b7c6d5e4f3a2b1c0d9e8f7a"
	tests := []struct {
		name, ref string
		dgst, id  digest.Digest
	}{
		{name: "wasm-app:layer", ref: "docker.io/library/wasm-app:layer"},
		{name: "wasm-app", ref: "docker.io/library/wasm-app:latest"},
		{name: "library/wasm-app:layer", ref: "docker.io/library/wasm-app:layer"},
		{name: "docker.io/library/wasm-app:layer", ref: "docker.io/library/wasm-app:layer"},
		{name: "myorg/app@" + d, ref: "docker.io/myorg/app@" + d, dgst: d},
		{name: "myorg/app:v1@" + d, ref: "docker.io/myorg/app@" + d, dgst: d},
		{name: "127.0.0.1:5000/app:v2", ref: "127.0.0.1:5000/app:v2"},
		{name: d, id: d},
		{name: "Not A Reference"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ref, dgst, id := normalizeImageName(tt.name)
			if ref != tt.ref || dgst != tt.dgst || id != tt.id {
				t.Fatalf("normalizeImageName(%q) = %q, %q, %q; want %q, %q, %q", tt.name, ref, dgst, id, tt.ref, tt.dgst, tt.id)
			}
		})
	}
}

// imageFixture is a containerd metadata store with two images: one CRI
// pulled by tag (so it also has a repo-digest name), one known by tag only.
type imageFixture struct {
	k            *kind
	ctx          context.Context
	layer, other images.Image
	layerConfig  digest.Digest
}

func newImageFixture(t *testing.T) *imageFixture {
	t.Helper()
	dir := t.TempDir()
	cs, err := local.NewStore(filepath.Join(dir, "content"))
	if err != nil {
		t.Fatal(err)
	}
	bdb, err := bolt.Open(filepath.Join(dir, "meta.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bdb.Close() })
	db := metadata.NewDB(bdb, cs, nil)
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	if err := db.Init(ctx); err != nil {
		t.Fatal(err)
	}
	f := &imageFixture{k: &kind{images: metadata.NewImageStore(db), records: metadata.NewContainerStore(db), content: db.ContentStore()}, ctx: ctx}
	blob := func(mediaType string, v any) ocispec.Descriptor {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		desc := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
		if err := content.WriteBlob(ctx, db.ContentStore(), desc.Digest.String(), bytes.NewReader(b), desc); err != nil {
			t.Fatal(err)
		}
		return desc
	}
	manifest := func(label string) (ocispec.Descriptor, digest.Digest) {
		cfg := blob(ocispec.MediaTypeImageConfig, ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
			Config: ocispec.ImageConfig{Labels: map[string]string{"wasm.kuasar.io/module": label}}})
		m := blob(ocispec.MediaTypeImageManifest, ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest, Config: cfg})
		return m, cfg.Digest
	}
	create := func(name string, target ocispec.Descriptor) images.Image {
		img, err := f.k.images.Create(ctx, images.Image{Name: name, Target: target})
		if err != nil {
			t.Fatal(err)
		}
		return img
	}
	m1, c1 := manifest("layer")
	f.layer, f.layerConfig = create("docker.io/library/wasm-app:layer", m1), c1
	create("docker.io/library/wasm-app@"+m1.Digest.String(), m1)
	m2, _ := manifest("other")
	f.other = create("docker.io/myorg/app:v1", m2)
	return f
}

// record makes containerd's record of a container, as CRI would.
func (f *imageFixture) record(t *testing.T, id, image string, cri *criMetadata) {
	t.Helper()
	c := ctrs.Container{ID: id, Image: image, Runtime: ctrs.RuntimeInfo{Name: "io.containerd.kuasar.v1"},
		Spec: &anypb.Any{TypeUrl: "types.containerd.io/opencontainers/runtime-spec/1/Spec", Value: []byte("{}")}}
	if cri != nil {
		b, err := json.Marshal(cri)
		if err != nil {
			t.Fatal(err)
		}
		c.Extensions = map[string]typeurl.Any{criContainerMetadata: &anypb.Any{TypeUrl: "github.com/containerd/cri/pkg/store/container/Metadata", Value: b}}
	}
	if _, err := f.k.records.Create(f.ctx, c); err != nil {
		t.Fatal(err)
	}
}

func criMeta(name string, d digest.Digest) *criMetadata {
	m := &criMetadata{Version: "v1"}
	m.Metadata.ImageName, m.Metadata.ImageDigest = name, d.String()
	return m
}

// TestImageOf: a container's image is found from containerd's record of
// it when there is one, else from the name in CRI's annotation however the
// user wrote it (short, tagged, by digest, by image ID).
func TestImageOf(t *testing.T) {
	f := newImageFixture(t)
	f.record(t, "by-image-field", f.layer.Name, nil)
	f.record(t, "by-cri-name", "", criMeta(f.other.Name, ""))
	f.record(t, "by-cri-digest", "", criMeta("docker.io/myorg/app:deleted-tag", f.other.Target.Digest))
	// The annotation is the user's; the record says what CRI resolved.
	f.record(t, "record-first", "", criMeta(f.layer.Name, f.layer.Target.Digest))
	tests := []struct {
		name, id, annotation string
		want                 string // image name, "" for none
	}{
		{name: "record's image", id: "by-image-field", want: f.layer.Name},
		{name: "CRI's resolved name", id: "by-cri-name", want: f.other.Name},
		{name: "CRI's resolved digest", id: "by-cri-digest", want: f.other.Name},
		{name: "the record over the annotation", id: "record-first", annotation: "myorg/app:v1", want: f.layer.Name},
		{name: "short name", id: "none", annotation: "wasm-app:layer", want: f.layer.Name},
		{name: "library name", id: "none", annotation: "library/wasm-app:layer", want: f.layer.Name},
		{name: "full name", id: "none", annotation: "docker.io/library/wasm-app:layer", want: f.layer.Name},
		{name: "repo digest", id: "none", annotation: "wasm-app@" + f.layer.Target.Digest.String(), want: "docker.io/library/wasm-app@" + f.layer.Target.Digest.String()},
		{name: "tag and digest", id: "none", annotation: "wasm-app:layer@" + f.layer.Target.Digest.String(), want: "docker.io/library/wasm-app@" + f.layer.Target.Digest.String()},
		{name: "digest of an image known by tag only", id: "none", annotation: "myorg/app@" + f.other.Target.Digest.String(), want: f.other.Name},
		{name: "image ID", id: "none", annotation: f.layerConfig.String(), want: f.layer.Name},
		{name: "unknown image", id: "none", annotation: "nothing:here"},
		{name: "no image at all", id: "none"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := &task.Container{ID: tt.id, Namespace: "k8s.io", Spec: &specs.Spec{Annotations: map[string]string{}}}
			if tt.annotation != "" {
				c.Spec.Annotations[imageNameAnnotation] = tt.annotation
			}
			img, ok, err := f.k.imageOf(f.ctx, c)
			if err != nil {
				t.Fatal(err)
			}
			if got := map[bool]string{true: img.Name}[ok]; got != tt.want {
				t.Fatalf("image %q (found %v), want %q", got, ok, tt.want)
			}
		})
	}
}
