package builtins

import (
	"context"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/sandbox"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Stand-ins for the two shapes of CRI's plugin instance in containerd
// v2.4: *criGRPCServer, and criGRPCServerWithTCP{*criGRPCServer}.
type fakeCRIServer struct {
	runtime.RuntimeServiceServer
	other int
}

type fakeCRIServerWithTCP struct {
	*fakeCRIServer
}

type listing struct {
	runtime.UnimplementedRuntimeServiceServer
	items []*runtime.PodSandbox
}

func (l *listing) ListPodSandbox(context.Context, *runtime.ListPodSandboxRequest) (*runtime.ListPodSandboxResponse, error) {
	return &runtime.ListPodSandboxResponse{Items: l.items}, nil
}

type fakeStore struct {
	sandbox.Store
	created map[string]time.Time
	gets    int
}

func (s *fakeStore) Get(_ context.Context, id string) (sandbox.Sandbox, error) {
	s.gets++
	return sandbox.Sandbox{ID: id, CreatedAt: s.created[id]}, nil
}

func TestRecoveredCreatedAt(t *testing.T) {
	created := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name string
		inst func(runtime.RuntimeServiceServer) (any, func() runtime.RuntimeServiceServer)
	}{
		{"pointer", func(rs runtime.RuntimeServiceServer) (any, func() runtime.RuntimeServiceServer) {
			s := &fakeCRIServer{RuntimeServiceServer: rs}
			return s, func() runtime.RuntimeServiceServer { return s }
		}},
		{"embedded in a value", func(rs runtime.RuntimeServiceServer) (any, func() runtime.RuntimeServiceServer) {
			s := fakeCRIServerWithTCP{&fakeCRIServer{RuntimeServiceServer: rs}}
			return s, func() runtime.RuntimeServiceServer { return s }
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := &listing{items: []*runtime.PodSandbox{
				{Id: "recovered", CreatedAt: time.Time{}.UnixNano()},
				{Id: "fresh", CreatedAt: created.Add(time.Hour).UnixNano()},
			}}
			store := &fakeStore{created: map[string]time.Time{"recovered": created}}
			inst, served := tc.inst(l)
			if err := interposeRuntimeService(inst, func(rs runtime.RuntimeServiceServer) runtime.RuntimeServiceServer {
				return &createdAtFix{RuntimeServiceServer: rs, store: store}
			}); err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 2; i++ {
				resp, err := served().ListPodSandbox(context.Background(), &runtime.ListPodSandboxRequest{})
				if err != nil {
					t.Fatal(err)
				}
				if got := time.Unix(0, resp.Items[0].CreatedAt).UTC(); !got.Equal(created) {
					t.Fatalf("recovered pod listed as created at %v, want %v", got, created)
				}
				if got := time.Unix(0, resp.Items[1].CreatedAt).UTC(); !got.Equal(created.Add(time.Hour)) {
					t.Fatalf("a pod with a creation time was changed: %v", got)
				}
			}
			if store.gets != 1 {
				t.Fatalf("sandbox store read %d times, want once", store.gets)
			}
		})
	}
	for _, other := range []any{struct{ x int }{}, nilEmbedded{}, (*fakeCRIServer)(nil), nil} {
		if err := interposeRuntimeService(other, func(rs runtime.RuntimeServiceServer) runtime.RuntimeServiceServer { return rs }); err == nil {
			t.Fatalf("an instance of another shape (%T) was accepted", other)
		}
	}
}

// nilEmbedded would have reflection's FieldByName panic: the field is
// promoted through a nil pointer.
type nilEmbedded struct {
	*fakeCRIServer
	x int
}
