package wasmhost

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost/api"
)

func TestNewEnviron(t *testing.T) {
	tests := []struct {
		name    string
		env     []string
		cwd     string
		want    []string
		wantErr func(error) bool
	}{
		{name: "PWD from the working directory", env: []string{"A=1"}, cwd: "/app", want: []string{"A=1", "PWD=/app"}},
		{name: "PWD of the root", env: nil, want: []string{"PWD=/"}},
		{name: "PWD as set", env: []string{"PWD=/x", "B=2"}, cwd: "/app", want: []string{"PWD=/x", "B=2"}},
		{name: "a later value replaces an earlier one, in its place", env: []string{"A=1", "B=2", "A=3"}, want: []string{"A=3", "B=2", "PWD=/"}},
		{name: "entries without = are left out", env: []string{"JUNK", "A=b=c"}, want: []string{"A=b=c", "PWD=/"}},
		{name: "empty name", env: []string{"=x"}, wantErr: errdefs.IsInvalidArgument},
		{name: "NUL byte", env: []string{"A=x\x00y"}, wantErr: errdefs.IsInvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, err := newEnviron(context.Background(), tt.env, tt.cwd)
			if tt.wantErr != nil {
				if !tt.wantErr(err) {
					t.Fatalf("err %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			size := uint64(0)
			for _, b := range e.entries {
				got = append(got, string(b))
				size += uint64(len(b)) + 1
			}
			if !slices.Equal(got, tt.want) || size != e.size {
				t.Fatalf("environ %q (size %d, counted %d), want %q", got, e.size, size, tt.want)
			}
		})
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := newEnviron(ctx, []string{"A=1"}, "/"); !errors.Is(err, context.Canceled) {
		t.Errorf("a create given up on still built the environment: %v", err)
	}
}

// TestEnvironScales: preparing a module instance costs time linear in its
// environment. Measured as bytes allocated (a count of work done, not a
// clock): twenty times the variables must cost about twenty times as much
// (a quadratic build would cost four hundred times).
func TestEnvironScales(t *testing.T) {
	budget := newFileBudget(10)
	cost := func(n int) uint64 {
		env := make([]string, n)
		for i := range env {
			env[i] = fmt.Sprintf("VARIABLE_%06d=value-%06d", i, i)
		}
		best := ^uint64(0)
		for range 3 {
			p := &process{spec: &api.Process{Args: []string{"/app.wasm"}, Env: env}, stdio: &stdio{}, files: newRootFS(budget)}
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			e, err := newEnviron(context.Background(), p.spec.GetEnv(), "/")
			if err != nil {
				t.Fatal(err)
			}
			p.env = e
			_ = p.moduleConfig()
			runtime.ReadMemStats(&after)
			best = min(best, after.TotalAlloc-before.TotalAlloc)
		}
		return best
	}
	small, large := cost(1000), cost(20000)
	ratio := float64(large) / float64(small)
	t.Logf("1,000 variables: %d bytes allocated; 20,000: %d (%.1f times)", small, large, ratio)
	if ratio > 60 {
		t.Fatalf("20 times the environment costs %.0f times as much: not linear", ratio)
	}
}
