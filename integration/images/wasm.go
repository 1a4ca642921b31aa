package images

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Wasm test images. Both layouts carry the same module (integration/wasmapp).
const (
	// WasmLayer carries the module as a Wasm layer
	// (application/vnd.wasm.content.layer.v1+wasm), as runwasi-style images
	// do; its rootfs is empty.
	WasmLayer = "docker.io/library/wasm-app:layer"
	// WasmRootfs is an ordinary image with the module at /app/app.wasm.
	WasmRootfs = "docker.io/library/wasm-app:rootfs"
	// WasmHello and WasmSleep are minimal modules (a few hundred bytes)
	// that print a line, and sleep for ever.
	WasmHello = "docker.io/library/wasm-hello:layer"
	WasmSleep = "docker.io/library/wasm-sleep:layer"
	// Broken images, for the bad-input tests.
	WasmNoModule = "docker.io/library/wasm-bad:nomodule" // command names a shell script
	WasmInvalid  = "docker.io/library/wasm-bad:invalid"  // Wasm layer of garbage
	WasmImports  = "docker.io/library/wasm-bad:imports"  // module imports env.foo
)

// WasmLayerMediaType is the media type of a Wasm module layer.
const WasmLayerMediaType = "application/vnd.wasm.content.layer.v1+wasm"

// wasmAppPackage is the test workload, built with GOOS=wasip1.
const wasmAppPackage = "github.com/kuasar-io/containerd-kuasar/integration/wasmapp"

// BuildWasmModule compiles a WASI module from a Go package of this module
// (run from inside the module's tree).
func BuildWasmModule(pkg string) ([]byte, error) {
	dir, err := os.MkdirTemp("", "wasm-build")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	out := filepath.Join(dir, "module.wasm")
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, pkg)
	cmd.Env = append(os.Environ(), "GOOS=wasip1", "GOARCH=wasm", "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("building %s for wasip1: %v: %s", pkg, err, b)
	}
	return os.ReadFile(out)
}

// helloModule is a minimal WASI command, assembled here: it writes
// "hello from wasm\n" to stdout and returns. A few hundred bytes, so that
// start-up figures measure the runtime, not the compiler.
var helloModule = assemble("fd_write",
	// At 0 the iovec {ptr 16, len 16}, at 8 room for nwritten, at 16 the text.
	append([]byte{16, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, "hello from wasm\n"...),
	[]byte{
		0x41, 0x01, 0x41, 0x00, 0x41, 0x01, 0x41, 0x08, // fd 1, iovs 0, 1 iovec, nwritten at 8
		0x10, 0x00, 0x1a, // call fd_write; drop
	})

// sleepModule is a minimal WASI command that sleeps for ever, an hour at a
// time: the smallest workload, for the memory a Wasm pod costs.
var sleepModule = assemble("poll_oneoff",
	// At 0 a clock subscription: monotonic, 3600 s; events go to 48, the
	// count to 80.
	[]byte{
		0, 0, 0, 0, 0, 0, 0, 0, // userdata
		0, 0, 0, 0, 0, 0, 0, 0, // clock
		1, 0, 0, 0, 0, 0, 0, 0, // monotonic
		0x00, 0xa0, 0xb8, 0x30, 0x46, 0x03, 0x00, 0x00, // 3600e9 ns
		0, 0, 0, 0, 0, 0, 0, 0, // precision
		0, 0, 0, 0, 0, 0, 0, 0, // flags
	},
	[]byte{
		0x03, 0x40, // loop
		0x41, 0x00, 0x41, 0x30, 0x41, 0x01, 0x41, 0xd0, 0x00, // in 0, out 48, 1, nevents at 80
		0x10, 0x00, 0x1a, // call poll_oneoff; drop
		0x0c, 0x00, 0x0b, // br 0; end
	})

// assemble makes a WASI command module that imports one function of type
// (i32, i32, i32, i32) -> i32 from wasi_snapshot_preview1, has one page of
// memory initialised with data at 0, and runs code as its _start.
func assemble(imported string, data, code []byte) []byte {
	uleb := func(n int) []byte {
		var b []byte
		for {
			c := byte(n & 0x7f)
			n >>= 7
			if n != 0 {
				b = append(b, c|0x80)
				continue
			}
			return append(b, c)
		}
	}
	vec := func(n int, items ...[]byte) []byte { return append(uleb(n), bytes.Join(items, nil)...) }
	name := func(s string) []byte { return append(uleb(len(s)), s...) }
	section := func(id byte, payload []byte) []byte {
		return append(append([]byte{id}, uleb(len(payload))...), payload...)
	}
	const i32 = 0x7f
	body := append(append([]byte{0x00}, code...), 0x0b) // no locals; code; end
	return bytes.Join([][]byte{
		{0x00, 'a', 's', 'm', 0x01, 0x00, 0x00, 0x00},
		section(1, vec(2, []byte{0x60, 4, i32, i32, i32, i32, 1, i32}, []byte{0x60, 0, 0})),
		section(2, vec(1, name("wasi_snapshot_preview1"), name(imported), []byte{0x00, 0x00})),
		section(3, vec(1, []byte{0x01})),
		section(5, vec(1, []byte{0x00, 0x01})),
		section(7, vec(2, name("memory"), []byte{0x02, 0x00}, name("_start"), []byte{0x00, 0x01})),
		section(10, vec(1, append(uleb(len(body)), body...))),
		section(11, vec(1, []byte{0x00, 0x41, 0x00, 0x0b}, append(uleb(len(data)), data...))),
	}, nil)
}

// WithCustomSection returns module with a custom section appended: the
// same program, another digest (a module the host has never compiled).
func WithCustomSection(module []byte, name string, payload []byte) []byte {
	content := append(append([]byte{byte(len(name))}, name...), payload...)
	out := append([]byte(nil), module...)
	out = append(out, 0x00)
	n := len(content)
	for {
		c := byte(n & 0x7f)
		n >>= 7
		if n != 0 {
			out = append(out, c|0x80)
			continue
		}
		out = append(out, c)
		break
	}
	return append(out, content...)
}

// HelloModule returns the minimal WASI module that prints a line.
func HelloModule() []byte { return append([]byte(nil), helloModule...) }

// SleepModule returns the minimal WASI module that sleeps for ever.
func SleepModule() []byte { return append([]byte(nil), sleepModule...) }

// AppModule builds the test workload module.
func AppModule() ([]byte, error) { return BuildWasmModule(wasmAppPackage) }

// WasmLayerImage is an image whose only layer is the module.
func WasmLayerImage(module []byte, entrypoint string) (v1.Image, error) {
	l := static.NewLayer(module, types.MediaType(WasmLayerMediaType))
	img, err := mutate.Append(empty.Image, mutate.Addendum{
		Layer:       l,
		MediaType:   types.MediaType(WasmLayerMediaType),
		Annotations: map[string]string{"org.opencontainers.image.title": filepath.Base(entrypoint)},
	})
	if err != nil {
		return nil, err
	}
	img = mutate.MediaType(img, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS, cf.Created = "amd64", "linux", v1.Time{Time: epoch}
	// The config names the module: CRI identifies an image by its
	// config's digest, and the Wasm layer is not in the config's rootfs.
	digest, err := l.Digest()
	if err != nil {
		return nil, err
	}
	cf.Config = v1.Config{Entrypoint: []string{entrypoint}, Labels: map[string]string{"wasm.kuasar.io/module": digest.String()}}
	// A Wasm layer is not a file system layer: the rootfs is empty
	// (stock CRI looks for a snapshot of every layer listed there).
	cf.RootFS = v1.RootFS{Type: "layers"}
	return mutate.ConfigFile(img, cf)
}

// BuildWasmLayer is the runwasi-style image of the test module.
func BuildWasmLayer() (v1.Image, error) {
	m, err := BuildWasmModule(wasmAppPackage)
	if err != nil {
		return nil, err
	}
	return WasmLayerImage(m, "/app.wasm")
}

// BuildWasmRootfs is an ordinary image holding the test module.
func BuildWasmRootfs() (v1.Image, error) {
	m, err := BuildWasmModule(wasmAppPackage)
	if err != nil {
		return nil, err
	}
	files := []File{
		{Path: "/app", Dir: true, Mode: 0o755},
		{Path: "/app/app.wasm", Mode: 0o755, Data: m},
		{Path: "/app/hello.wasm", Mode: 0o755, Data: helloModule},
		{Path: "/app/notes.txt", Mode: 0o644, Data: []byte("a file of the image\n")},
		{Path: "/data", Dir: true, Mode: 0o777},
		{Path: "/etc", Dir: true, Mode: 0o755},
	}
	l, err := Layer(files)
	if err != nil {
		return nil, err
	}
	return Image(v1.Config{Entrypoint: []string{"/app/app.wasm"}, Env: []string{"PATH=/app"}, WorkingDir: "/app"}, l)
}

// BuildWasmHello is the minimal module as a Wasm layer.
func BuildWasmHello() (v1.Image, error) {
	return WasmLayerImage(helloModule, "/hello.wasm")
}

// BuildWasmNoModule names a shell script as its command.
func BuildWasmNoModule() (v1.Image, error) {
	l, err := Layer([]File{{Path: "/app", Dir: true, Mode: 0o755}, {Path: "/app/run.wasm", Mode: 0o755, Data: []byte("#!/bin/sh\necho not wasm\n")}})
	if err != nil {
		return nil, err
	}
	return Image(v1.Config{Entrypoint: []string{"/app/run.wasm"}}, l)
}

// BuildWasmInvalid carries a Wasm layer that is not a valid module.
func BuildWasmInvalid() (v1.Image, error) {
	return WasmLayerImage([]byte("\x00asm\x01\x00\x00\x00not a module"), "/bad.wasm")
}

// BuildWasmImports carries a module that imports env.foo.
func BuildWasmImports() (v1.Image, error) {
	return WasmLayerImage([]byte("\x00asm\x01\x00\x00\x00\x01\x04\x01\x60\x00\x00\x02\x0b\x01\x03env\x03foo\x00\x00"), "/imports.wasm")
}

// WasmBuilders are the Wasm test images.
var WasmBuilders = map[string]func() (v1.Image, error){
	WasmLayer:    BuildWasmLayer,
	WasmRootfs:   BuildWasmRootfs,
	WasmHello:    BuildWasmHello,
	WasmSleep:    func() (v1.Image, error) { return WasmLayerImage(sleepModule, "/sleep.wasm") },
	WasmNoModule: BuildWasmNoModule,
	WasmInvalid:  BuildWasmInvalid,
	WasmImports:  BuildWasmImports,
}

func init() {
	for ref, build := range WasmBuilders {
		Builders[ref] = build
	}
}
