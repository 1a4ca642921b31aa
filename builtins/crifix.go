package builtins

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/log"
	"github.com/containerd/plugin"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	ksandbox "github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
)

// criGRPCPluginURI is the CRI plugin that serves the CRI gRPC API.
var criGRPCPluginURI = plugins.GRPCPlugin.String() + ".cri"

// criNamespace is the containerd namespace CRI keeps its objects in.
const criNamespace = "k8s.io"

// withCRIFixes wraps CRI's runtime service, between CRI's instrumentation
// (logs, traces, the initialized check) and its service, by replacing the
// RuntimeServiceServer the CRI plugin's instance embeds, with:
//
//   - createdAtFix: containerd v2.4's CRI recovery builds the status of
//     every sandbox that is not podsandbox's without its creation time
//     (internal/cri/server/restart.go: sandboxstore.NewSandbox(metadata,
//     Status{State: state})), so after a restart ListPodSandbox reports
//     such pods as created in 1754. The sandbox store has the right time.
//   - portForwardFix: port-forwards of pods whose kind forwards ports
//     itself (VM pods) go through the kind (portforward.go).
//
// When the instance does not have the expected shape (a containerd version
// that changed it), it logs and leaves CRI as it is.
func withCRIFixes(r *plugin.Registration) {
	initFn := r.InitFn
	r.Requires = append(r.Requires, plugins.SandboxStorePlugin, plugins.SandboxControllerPlugin)
	r.InitFn = func(ic *plugin.InitContext) (any, error) {
		inst, err := initFn(ic)
		if err != nil {
			return inst, err
		}
		var store sandbox.Store
		if s, err := ic.GetSingle(plugins.SandboxStorePlugin); err != nil {
			log.G(ic.Context).WithError(err).Warn("no sandbox store: pods of Kuasar sandboxes will be listed without their creation time after a restart")
		} else if store, _ = s.(sandbox.Store); store == nil {
			log.G(ic.Context).Warnf("sandbox store of type %T: pods will be listed without their creation time after a restart", s)
		}
		var controllers []*ksandbox.Controller
		if cs, err := ic.GetByType(plugins.SandboxControllerPlugin); err == nil {
			for _, c := range cs {
				if kc, ok := c.(*ksandbox.Controller); ok {
					controllers = append(controllers, kc)
				}
			}
		}
		if err := interposeRuntimeService(inst, func(rs runtime.RuntimeServiceServer) runtime.RuntimeServiceServer {
			if store != nil {
				rs = &createdAtFix{RuntimeServiceServer: rs, store: store}
			}
			return &portForwardFix{RuntimeServiceServer: rs, controllers: controllers}
		}); err != nil {
			log.G(ic.Context).WithError(err).Warn("cannot wrap CRI's runtime service: Kuasar pods will be listed without their creation time after a restart, and VM pods cannot be port-forwarded")
		}
		return inst, nil
	}
}

var runtimeServiceType = reflect.TypeFor[runtime.RuntimeServiceServer]()

// interposeRuntimeService replaces, in the CRI plugin's instance, the
// RuntimeServiceServer field of the struct it is (or embeds, through
// pointers) with wrap's result. It never panics: an instance of another
// shape is an error.
func interposeRuntimeService(inst any, wrap func(runtime.RuntimeServiceServer) runtime.RuntimeServiceServer) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("CRI plugin instance of type %T: %v", inst, r)
		}
	}()
	v := reflect.ValueOf(inst)
	for depth := 0; depth < 4; depth++ {
		if v.Kind() == reflect.Pointer {
			if v.IsNil() {
				break
			}
			// Reached through an unexported field the value is read-only;
			// the struct it points to is what we change.
			v = reflect.NewAt(v.Type().Elem(), v.UnsafePointer()).Elem()
			continue
		}
		if v.Kind() != reflect.Struct {
			break
		}
		// Fields of this struct itself, not promoted ones (which may go
		// through nil pointers).
		for i := 0; i < v.NumField(); i++ {
			if f := v.Type().Field(i); f.Name == "RuntimeServiceServer" && f.Type == runtimeServiceType {
				fv := v.Field(i)
				if !fv.CanSet() {
					return fmt.Errorf("CRI plugin instance of type %T: its runtime service cannot be set", inst)
				}
				cur, _ := fv.Interface().(runtime.RuntimeServiceServer)
				if cur == nil {
					return errors.New("CRI's runtime service is not set")
				}
				fv.Set(reflect.ValueOf(wrap(cur)))
				return nil
			}
		}
		if v.NumField() == 0 || !v.Type().Field(0).Anonymous {
			break
		}
		v = v.Field(0)
	}
	return fmt.Errorf("CRI plugin instance of type %T has no RuntimeServiceServer to wrap", inst)
}

// createdAtFix gives ListPodSandbox items recovered without a creation
// time the one the sandbox store keeps.
type createdAtFix struct {
	runtime.RuntimeServiceServer
	store sandbox.Store
	known sync.Map // sandbox ID -> time.Time
}

func (f *createdAtFix) ListPodSandbox(ctx context.Context, r *runtime.ListPodSandboxRequest) (*runtime.ListPodSandboxResponse, error) {
	resp, err := f.RuntimeServiceServer.ListPodSandbox(ctx, r)
	if err != nil || resp == nil {
		return resp, err
	}
	for _, item := range resp.Items {
		if item.GetCreatedAt() > 0 {
			continue
		}
		if t, ok := f.createdAt(ctx, item.GetId()); ok {
			item.CreatedAt = t.UnixNano()
		}
	}
	return resp, nil
}

func (f *createdAtFix) RemovePodSandbox(ctx context.Context, r *runtime.RemovePodSandboxRequest) (*runtime.RemovePodSandboxResponse, error) {
	resp, err := f.RuntimeServiceServer.RemovePodSandbox(ctx, r)
	if err == nil {
		f.known.Delete(r.GetPodSandboxId())
	}
	return resp, err
}

func (f *createdAtFix) createdAt(ctx context.Context, id string) (time.Time, bool) {
	if t, ok := f.known.Load(id); ok {
		return t.(time.Time), true
	}
	sb, err := f.store.Get(namespaces.WithNamespace(ctx, criNamespace), id)
	if err != nil || sb.CreatedAt.IsZero() {
		return time.Time{}, false
	}
	f.known.Store(id, sb.CreatedAt)
	return sb.CreatedAt, true
}
