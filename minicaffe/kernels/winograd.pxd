# Winograd F(2x2, 3x3) and F(4x4, 3x3) for 3x3 stride-1 convolutions: the tile grid, the transforms
# of windows, filters and output gradients, and the blocked forward pass; conv.pyx plans and calls them:
#     from minicaffe.kernels.winograd cimport TileGrid, make_grid, filter_row, winograd_apply, ...
from cython cimport floating


cdef struct TileGrid:
    # A batch of [channels, height, width] images convolved into [out_channels, out_h, out_w] with
    # padding pad_h, pad_w; output tile (ty, tx) covers rows tile * ty .. tile * ty + tile - 1 and the
    # same columns of tx; alpha = tile + 2 is the side of its input window.
    int batch, channels, height, width, out_channels, out_h, out_w, pad_h, pad_w
    int tile, alpha
    int tiles_h, tiles_w
    long tiles_per_image, tiles


cdef TileGrid make_grid(int batch, int channels, int height, int width, int out_channels, int out_h,
                        int out_w, int pad_h, int pad_w, int tile) noexcept nogil

cdef long plane_stride(long elements) noexcept nogil

cdef long scratch_elements(int tile, int widest) noexcept nogil

cdef void input_channel(const TileGrid* g, const floating* x, int c, long t0, int count, floating* v,
                        long ld, floating* scratch) noexcept nogil

cdef void output_grad_channel(const TileGrid* g, const floating* dy, int m, long t0, int count,
                              floating* z, long ld, floating* scratch) noexcept nogil

cdef void filter_row(const floating* w, int row, int in_channels, int out_channels, bint adjoint, int tile,
                     floating* u) noexcept nogil

cdef void add_filter_grad_row(const floating* du, int m, int out_channels, int in_channels, int tile,
                              floating* dw) noexcept nogil

cdef void winograd_apply(const TileGrid* g, const floating* x, const floating* u, const floating* bias,
                         floating* y, floating* v, floating* mo, int block, floating* scratch,
                         long scratch_size, int threads) noexcept nogil
