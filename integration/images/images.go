// Package images builds the test images of containerd-kuasar locally, from
// Debian packages and local builds (nothing is pulled from the internet),
// and serves them from a local registry that containerd reaches through
// registry mirrors, under their usual names.
package images

import (
	"archive/tar"
	"bytes"
	"context"
	_ "embed"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Names of the images the tests and the demo use.
const (
	Busybox = "docker.io/library/busybox:kuasar"
	Pause   = "registry.k8s.io/pause:3.10.2"
)

// epoch is the fixed timestamp of every file, so builds are reproducible.
var epoch = time.Unix(0, 0)

// File is one entry of an image layer.
type File struct {
	Path     string // absolute path in the image
	Mode     int64  // permission bits
	Dir      bool
	Link     string // symlink target
	HardLink string // hard link target (absolute path in the image)
	Data     []byte
}

// Layer makes a reproducible layer from files.
func Layer(files []File) (v1.Layer, error) {
	// Hard links come last: their targets must be written before them.
	sort.SliceStable(files, func(i, j int) bool {
		if hi, hj := files[i].HardLink != "", files[j].HardLink != ""; hi != hj {
			return hj
		}
		return files[i].Path < files[j].Path
	})
	modes := map[string]int64{}
	for _, f := range files {
		modes[f.Path] = f.Mode
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, f := range files {
		if f.HardLink != "" && f.Mode == 0 {
			// Unpacking applies a link's mode to the file it links to.
			f.Mode = modes[f.HardLink]
		}
		h := &tar.Header{Name: strings.TrimPrefix(f.Path, "/"), Mode: f.Mode, ModTime: epoch, Format: tar.FormatPAX}
		switch {
		case f.Dir:
			h.Typeflag, h.Name = tar.TypeDir, h.Name+"/"
		case f.Link != "":
			h.Typeflag, h.Linkname = tar.TypeSymlink, f.Link
		case f.HardLink != "":
			h.Typeflag, h.Linkname = tar.TypeLink, strings.TrimPrefix(f.HardLink, "/")
		default:
			h.Typeflag, h.Size = tar.TypeReg, int64(len(f.Data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := tw.Write(f.Data); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	data := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil })
}

// Image assembles an image from layers and a process config.
func Image(cfg v1.Config, layers ...v1.Layer) (v1.Image, error) {
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS, cf.Created = "amd64", "linux", v1.Time{Time: epoch}
	cf.Config = cfg
	return mutate.ConfigFile(img, cf)
}

// BaseFiles is a minimal root: directories, users and groups.
func BaseFiles() []File {
	var fs []File
	for _, d := range []string{"/bin", "/etc", "/root", "/var", "/var/www", "/home", "/dev", "/proc", "/sys", "/usr", "/usr/bin", "/usr/sbin", "/sbin"} {
		fs = append(fs, File{Path: d, Dir: true, Mode: 0o755})
	}
	fs = append(fs,
		File{Path: "/tmp", Dir: true, Mode: 0o1777},
		File{Path: "/etc/passwd", Mode: 0o644, Data: []byte("root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1:daemon:/usr/sbin:/bin/false\nnobody:x:65534:65534:nobody:/home:/bin/false\n")},
		File{Path: "/etc/group", Mode: 0o644, Data: []byte("root:x:0:\ndaemon:x:1:\nnogroup:x:65534:\n")},
	)
	return fs
}

// BusyboxFiles puts Debian's static busybox at /bin/busybox with every
// applet as a symlink to it.
func BusyboxFiles() ([]File, error) {
	const bin = "/bin/busybox"
	data, err := os.ReadFile(bin)
	if err != nil {
		return nil, fmt.Errorf("reading %s (install busybox-static): %w", bin, err)
	}
	out, err := exec.Command(bin, "--list-full").Output()
	if err != nil {
		return nil, fmt.Errorf("listing busybox applets: %w", err)
	}
	files := []File{{Path: "/bin/busybox", Mode: 0o755, Data: data}}
	for _, applet := range strings.Fields(string(out)) {
		p := "/" + applet
		if p == "/bin/busybox" {
			continue
		}
		files = append(files, File{Path: p, Link: "/bin/busybox"})
	}
	return files, nil
}

// BuildBusybox is the general-purpose test image.
func BuildBusybox() (v1.Image, error) {
	bb, err := BusyboxFiles()
	if err != nil {
		return nil, err
	}
	l, err := Layer(append(BaseFiles(), bb...))
	if err != nil {
		return nil, err
	}
	return Image(v1.Config{Cmd: []string{"sh"}, Env: []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}}, l)
}

//go:embed pause.c.txt
var pauseSource []byte

// BuildPause compiles a pause binary (stand-in for the Kubernetes one) for
// stock containerd's pod sandbox.
func BuildPause() (v1.Image, error) {
	data, err := compileC("pause", pauseSource)
	if err != nil {
		return nil, err
	}
	l, err := Layer([]File{{Path: "/pause", Mode: 0o755, Data: data}})
	if err != nil {
		return nil, err
	}
	return Image(v1.Config{Entrypoint: []string{"/pause"}, User: "65535:65535"}, l)
}

// MirrorRef is where ref lives on the local registry: same repository
// path, registry host replaced.
func MirrorRef(registry, ref string) (name.Reference, error) {
	r, err := name.ParseReference(ref)
	if err != nil {
		return nil, err
	}
	return name.ParseReference(registry+"/"+r.Context().RepositoryStr()+":"+r.Identifier(), name.Insecure)
}

// Push uploads img to the local registry under ref's mirrored name.
func Push(ctx context.Context, registry, ref string, img v1.Image) error {
	m, err := MirrorRef(registry, ref)
	if err != nil {
		return err
	}
	if err := remote.Write(m, img, remote.WithContext(ctx)); err != nil {
		return fmt.Errorf("pushing %s: %w", ref, err)
	}
	return nil
}

// Builders maps every standard test image to its builder.
var Builders = map[string]func() (v1.Image, error){
	Busybox: BuildBusybox,
	Pause:   BuildPause,
}

// PushAll builds every standard image and pushes it to registry.
func PushAll(ctx context.Context, registry string) error {
	return PushSet(ctx, registry, Builders)
}

// PushSet builds the images of builders and pushes them to registry.
func PushSet(ctx context.Context, registry string, builders map[string]func() (v1.Image, error)) error {
	for ref, build := range builders {
		img, err := build()
		if err != nil {
			return fmt.Errorf("building %s: %w", ref, err)
		}
		if err := Push(ctx, registry, ref, img); err != nil {
			return err
		}
	}
	return nil
}
