package wasmhost

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/tetratelabs/wazero"
)

// fakeCode is module code of its own digest (the compiler is faked in these
// tests: it never reads it).
func fakeCode(i int) []byte { return []byte(fmt.Sprintf("\x00asm\x01\x00\x00\x00 module %d", i)) }

func loadOf(code []byte) func(context.Context) ([]byte, func(), error) {
	return func(context.Context) ([]byte, func(), error) { return code, func() {}, nil }
}

func newTestEngine(t *testing.T, lim engineLimits) *engine {
	t.Helper()
	e, err := newEngine(context.Background(), "", 2, lim)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.close(context.Background()) })
	return e
}

// TestCompilePanic: a compiler that panics on a module is that module's
// error (the host goes on), and the engine compiles the next one.
func TestCompilePanic(t *testing.T) {
	e := newTestEngine(t, engineLimits{})
	e.compileFn = func(context.Context, []byte) (wazero.CompiledModule, error) { panic("compiler bug") }
	code := fakeCode(1)
	_, err := e.acquire(context.Background(), Digest(code), loadOf(code))
	if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "compiler failed") {
		t.Fatalf("acquire with a panicking compiler: %v", err)
	}
	if n := e.count(); n != 0 || e.compiling.Load() != 0 {
		t.Fatalf("after the panic: %d modules, %d compiling", n, e.compiling.Load())
	}
	e.compileFn = func(context.Context, []byte) (wazero.CompiledModule, error) { return nil, errors.New("plain error") }
	if _, err := e.acquire(context.Background(), Digest(code), loadOf(code)); !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "plain error") {
		t.Fatalf("the next compile of the module: %v", err)
	}
}

// TestCompileBounds: no more than maxCompiles modules compile at once, a
// caller waiting for a slot gives up at its deadline, and the code read to
// be compiled stays within the memory budget.
func TestCompileBounds(t *testing.T) {
	const slots = 2
	e := newTestEngine(t, engineLimits{maxCompiles: slots, compileMemory: 100})
	var active, peak atomic.Int32
	proceed := make(chan struct{})
	e.compileFn = func(context.Context, []byte) (wazero.CompiledModule, error) {
		n := active.Add(1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		<-proceed
		active.Add(-1)
		return nil, errors.New("done")
	}
	var wg sync.WaitGroup
	for i := 0; i < 3*slots; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			code := fakeCode(i)
			_, _ = e.acquire(context.Background(), Digest(code), loadOf(code))
		}()
	}
	for deadline := time.Now().Add(10 * time.Second); active.Load() < slots; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d compiles running, want %d", active.Load(), slots)
		}
	}
	// Every slot is taken: another compile waits, within its deadline.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	code := fakeCode(100)
	_, err := e.acquire(ctx, Digest(code), loadOf(code))
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("a compile beyond the slots: %v, want it to wait until its deadline", err)
	}
	if got := e.compiling.Load(); got != slots {
		t.Errorf("%d compiling, want %d", got, slots)
	}
	close(proceed)
	wg.Wait()
	if p := peak.Load(); p != slots {
		t.Errorf("%d compiles ran at once, want at most %d", p, slots)
	}

	// The memory budget (100 bytes here).
	release, err := e.reserve(context.Background(), 60)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 50*time.Millisecond)
	if _, err := e.reserve(ctx, 60); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("a second reservation past the budget: %v, want it to wait", err)
	}
	cancel()
	release()
	release() // once only
	again, err := e.reserve(context.Background(), 100)
	if err != nil {
		t.Fatalf("the whole budget once released: %v", err)
	}
	again()
	if _, err := e.reserve(context.Background(), 101); !errdefs.IsInvalidArgument(err) {
		t.Errorf("a module larger than the budget: %v, want invalid argument", err)
	}
	big := filepath.Join(t.TempDir(), "big.wasm")
	if err := os.WriteFile(big, make([]byte, 200), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := e.readModule(context.Background(), big); !errdefs.IsInvalidArgument(err) {
		t.Errorf("reading a module larger than the budget: %v, want invalid argument", err)
	}
}
