package images

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"
)

func TestHelloModule(t *testing.T) {
	ctx := context.Background()
	rt := wazero.NewRuntime(ctx)
	defer rt.Close(ctx)
	wasi_snapshot_preview1.MustInstantiate(ctx, rt)
	var out bytes.Buffer
	if _, err := rt.InstantiateWithConfig(ctx, HelloModule(), wazero.NewModuleConfig().WithStdout(&out)); err != nil {
		t.Fatal(err)
	}
	if out.String() != "hello from wasm\n" {
		t.Fatalf("output %q", out.String())
	}
	if n := len(HelloModule()); n > 512 {
		t.Errorf("hello module is %d bytes", n)
	}
}

func TestSleepModule(t *testing.T) {
	ctx := context.Background()
	rt := wazero.NewRuntimeWithConfig(ctx, wazero.NewRuntimeConfig().WithCloseOnContextDone(true))
	defer rt.Close(ctx)
	wasi_snapshot_preview1.MustInstantiate(ctx, rt)
	slept := 0
	cfg := wazero.NewModuleConfig().WithNanosleep(func(ns int64) {
		if ns != 3600e9 {
			t.Errorf("sleeps %d ns", ns)
		}
		slept++
	}).WithStartFunctions()
	m, err := rt.InstantiateWithConfig(ctx, WithCustomSection(SleepModule(), "x", []byte{1, 2}), cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx2, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	_, err = m.ExportedFunction("_start").Call(ctx2)
	if err == nil || slept < 2 {
		t.Fatalf("sleep module returned %v after %d sleeps", err, slept)
	}
}

func TestWasmLayerImage(t *testing.T) {
	img, err := WasmLayerImage(HelloModule(), "/hello.wasm")
	if err != nil {
		t.Fatal(err)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Layers) != 1 || string(m.Layers[0].MediaType) != WasmLayerMediaType || len(cf.RootFS.DiffIDs) != 0 || cf.Config.Entrypoint[0] != "/hello.wasm" {
		t.Fatalf("manifest %+v, config %+v", m, cf)
	}
}
